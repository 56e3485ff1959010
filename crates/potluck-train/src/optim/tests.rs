//! Unit tests of the inner optimizers (against PyTorch's numbers, and 8-bit against f32).

use super::*;
use potluck_core::Role;

// Reference values from PyTorch 2.13 (float64), produced by this script:
//
// import math, torch
// torch.set_default_dtype(torch.float64)
// def problem():
//     w = torch.tensor([math.sin(0.7 * i) for i in range(6)]).reshape(2, 3)
//     b = torch.tensor([0.1 * i - 0.2 for i in range(4)])
//     return w, b
// def grads(s):
//     gw = torch.tensor([math.cos(0.37 * i + s) for i in range(6)]).reshape(2, 3)
//     gb = torch.tensor([math.sin(1.3 * i - s) * 2.0 for i in range(4)])
//     return gw, gb
// def schedule(step, peak=0.1, warmup=2, total=10):
//     if step < warmup: return peak * (step + 1) / warmup
//     return peak * max(0.0, (total - step) / (total - warmup))
// def run(rule, clip):
//     w, b = problem(); w.requires_grad_(); b.requires_grad_()
//     if rule == "adamw":
//         opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
//                                 lr=0.1, betas=(0.9, 0.96), eps=1e-6)
//     m = {id(w): torch.zeros_like(w), id(b): torch.zeros_like(b)}
//     v = {id(w): torch.zeros_like(w), id(b): torch.zeros_like(b)}
//     for s in range(3):
//         lr = schedule(s)
//         gw, gb = grads(s); w.grad = gw.clone(); b.grad = gb.clone()
//         if clip: torch.nn.utils.clip_grad_norm_([w, b], max_norm=clip)
//         if rule == "adamw":
//             for g in opt.param_groups: g["lr"] = lr
//             opt.step()
//         else:
//             t = s + 1; c1 = 1 - 0.9 ** t; c2 = 1 - 0.96 ** t
//             with torch.no_grad():
//                 for p, wd in ((w, 0.1), (b, 0.0)):
//                     m[id(p)].mul_(0.9).add_(p.grad, alpha=0.1)
//                     v[id(p)].mul_(0.96).addcmul_(p.grad, p.grad, value=0.04)
//                     u = (m[id(p)] / c1) / ((v[id(p)] / c2).sqrt() + 1e-6) + wd * p
//                     pn = p.norm().clamp(max=0.5); un = u.norm()
//                     ratio = (pn / un).item() if pn > 0 and un > 0 else 1.0
//                     p.sub_(lr * ratio * u)
//     return torch.cat([w.detach().flatten(), b.detach()]).tolist()
// for rule in ("adamw", "lamb"):
//     for clip in (0.0, 1.0):
//         print(rule, clip, [round(x, 7) for x in run(rule, clip)])
//
// Output (rule, clip, w then b after three steps):
const ADAMW: [f64; 10] = [
    -0.1899215, 0.4864778, 0.8885722, 0.8626735, 0.423609, -0.1111914, -0.0412629, -0.258253,
    -0.2418082, 0.1569686,
];
const ADAMW_CLIP: [f64; 10] = [
    -0.1946084, 0.4786289, 0.881523, 0.8592963, 0.4231026, -0.1119076, -0.0415709, -0.265575,
    -0.2402454, 0.1634325,
];
const LAMB: [f64; 10] = [
    -0.0521678, 0.6033091, 0.9639966, 0.8708904, 0.3692923, -0.2813873, -0.1719704, -0.1252582,
    -0.0407551, 0.1073853,
];
const LAMB_CLIP: [f64; 10] = [
    -0.0537539, 0.6005864, 0.9615332, 0.8696874, 0.3690243, -0.2817661, -0.1718747, -0.1266904,
    -0.0406269, 0.1085437,
];

fn layout() -> Layout {
    Layout::new([("w", vec![2, 3], Role::Weight), ("b", vec![4], Role::Bias)]).unwrap()
}

fn params() -> Vec<f32> {
    let w = (0..6).map(|i| (0.7 * i as f64).sin() as f32);
    let b = (0..4).map(|i| (0.1 * i as f64 - 0.2) as f32);
    w.chain(b).collect()
}

fn grads(s: u64) -> Vec<f32> {
    let s = s as f64;
    let w = (0..6).map(|i| (0.37 * i as f64 + s).cos() as f32);
    let b = (0..4).map(|i| ((1.3 * i as f64 - s).sin() * 2.0) as f32);
    w.chain(b).collect()
}

fn config(rule: Rule, precision: Precision, clip: f64) -> Config {
    Config {
        rule,
        precision,
        schedule: Schedule {
            peak: 0.1,
            warmup: 2,
            total: 10,
        },
        beta1: 0.9,
        beta2: 0.96,
        eps: 1e-6,
        weight_decay: 0.1,
        bias_correction: true,
        clamp: 0.5,
        max_grad_norm: clip,
    }
}

fn run(cfg: Config, threads: usize) -> Vec<f32> {
    let mut opt = Optimizer::new(cfg, &layout()).with_threads(threads);
    let mut p = params();
    for s in 0..3 {
        opt.step(&mut p, &mut grads(s)).unwrap();
    }
    p
}

#[test]
fn f32_state_matches_pytorch() {
    for (rule, clip, want) in [
        (Rule::AdamW, 0.0, ADAMW),
        (Rule::AdamW, 1.0, ADAMW_CLIP),
        (Rule::Lamb, 0.0, LAMB),
        (Rule::Lamb, 1.0, LAMB_CLIP),
    ] {
        let got = run(config(rule, Precision::F32, clip), 2);
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() < 2e-6,
                "{rule:?} clip {clip}: {got:?}"
            );
        }
    }
}

#[test]
fn moments_come_out_as_f32_and_go_back_unchanged() {
    for precision in [Precision::F32, Precision::Blockwise8] {
        let mut opt = Optimizer::new(config(Rule::Lamb, precision, 0.0), &layout());
        let mut p = params();
        for s in 0..3 {
            opt.step(&mut p, &mut grads(s)).unwrap();
        }
        let flat = opt.moments_f32();
        assert_eq!(flat.len(), 2 * p.len());
        assert!(flat.iter().any(|x| *x != 0.0) && flat[p.len()..].iter().all(|x| *x >= 0.0));
        let before = opt.moments().clone();
        opt.set_moments_f32(&flat).unwrap();
        assert_eq!(opt.moments(), &before, "{precision:?}");
        // The mean of two peers' moments is what both hold after averaging.
        let half: Vec<f32> = flat.iter().map(|x| x / 2.0).collect();
        opt.set_moments_f32(&half).unwrap();
        let got = opt.moments_f32();
        for (g, w) in got.iter().zip(&half) {
            assert!(
                (g - w).abs() <= 0.02 * w.abs().max(1e-3),
                "{precision:?}: {g} vs {w}"
            );
        }
        // Bad values are refused and change nothing.
        let kept = opt.moments().clone();
        let mut bad = half.clone();
        bad[0] = f32::NAN;
        assert!(opt.set_moments_f32(&bad).is_err());
        let mut negative = half.clone();
        negative[p.len()] = -1.0;
        assert!(opt.set_moments_f32(&negative).is_err());
        assert!(opt.set_moments_f32(&half[1..]).is_err());
        assert_eq!(opt.moments(), &kept);
    }
}

#[test]
fn eight_bit_state_stays_close_to_f32() {
    for rule in [Rule::AdamW, Rule::Lamb] {
        let a = run(config(rule, Precision::F32, 0.0), 2);
        let b = run(config(rule, Precision::Blockwise8, 0.0), 2);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 0.01, "{rule:?}: {a:?} vs {b:?}");
        }
    }
}

#[test]
fn eight_bit_state_stays_close_with_gradients_over_many_decades() {
    // One block whose gradients span 1e-9..1: small second moments round to 0 in 8 bits,
    // which must not turn into outlier steps.
    let layout = Layout::new([("w", vec![BLOCK], Role::Weight)]).unwrap();
    let grad: Vec<f32> = (0..BLOCK)
        .map(|i| 10f32.powi(-((i % 10) as i32)) * if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let run = |precision| {
        let mut opt = Optimizer::new(config(Rule::Lamb, precision, 0.0), &layout);
        let mut p: Vec<f32> = (0..BLOCK).map(|i| ((i as f32) * 0.01).cos()).collect();
        for _ in 0..5 {
            opt.step(&mut p, &mut grad.clone()).unwrap();
        }
        p
    };
    let (a, b) = (run(Precision::F32), run(Precision::Blockwise8));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.01, "largest difference {worst}");
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // A layout spanning many blocks, so threads really split the work.
    let layout = Layout::new([
        ("a", vec![3 * BLOCK + 17], Role::Weight),
        ("b", vec![100], Role::Bias),
        ("c", vec![2 * BLOCK], Role::Embedding),
    ])
    .unwrap();
    let n = layout.numel();
    let grad: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.013).sin()).collect();
    for precision in [Precision::F32, Precision::Blockwise8] {
        for rule in [Rule::AdamW, Rule::Lamb] {
            let cfg = config(rule, precision, 0.0);
            let mut results = Vec::new();
            for threads in [1, 2, 5] {
                let mut opt = Optimizer::new(cfg, &layout).with_threads(threads);
                let mut p: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.007).cos()).collect();
                for _ in 0..2 {
                    opt.step(&mut p, &mut grad.clone()).unwrap();
                }
                results.push(p);
            }
            assert_eq!(results[0], results[1], "{rule:?} {precision:?}");
            assert_eq!(results[0], results[2], "{rule:?} {precision:?}");
        }
    }
}

#[test]
fn a_non_finite_gradient_changes_nothing() {
    let mut opt = Optimizer::new(config(Rule::Lamb, Precision::F32, 0.0), &layout());
    let mut p = params();
    let mut g = grads(0);
    g[3] = f32::NAN;
    assert!(matches!(
        opt.step(&mut p, &mut g),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(p, params());
    assert_eq!(opt.steps(), 0);
    assert!(opt.step(&mut p, &mut grads(0)[..5]).is_err());
}

#[test]
fn eight_bit_state_is_about_four_times_smaller() {
    let layout = Layout::new([("w", vec![1 << 20], Role::Weight)]).unwrap();
    let f32 = Optimizer::new(config(Rule::Lamb, Precision::F32, 0.0), &layout);
    let q8 = Optimizer::new(config(Rule::Lamb, Precision::Blockwise8, 0.0), &layout);
    let ratio = f32.moments().bytes() as f64 / q8.moments().bytes() as f64;
    assert!(ratio > 3.99, "{ratio}");
}

/// The outer optimizer is SGD with Nesterov momentum as PyTorch's `SGD(nesterov=True)` writes
/// it (`b ← μb + g`, `p ← p − lr(g + μb)`), followed here in f64 over three steps.
#[test]
fn nesterov_follows_sgd_with_nesterov_momentum() {
    let (lr, mu) = (0.7, 0.9);
    let mut opt = Optimizer::new(Config::outer(lr, mu), &layout());
    let mut p = params();
    let mut want: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
    let mut b = vec![0f64; p.len()];
    for s in 0..3 {
        let g = grads(s);
        for i in 0..p.len() {
            let gi = f64::from(g[i]);
            b[i] = mu * b[i] + gi;
            want[i] -= lr * (gi + mu * b[i]);
        }
        let info = opt.step(&mut p, &mut g.clone()).unwrap();
        assert_eq!(info.lr, lr);
    }
    for (got, want) in p.iter().zip(&want) {
        assert!((f64::from(*got) - want).abs() < 1e-5, "{got} vs {want}");
    }
    assert_eq!(opt.steps(), 3);
    // The buffer is the first moment: it travels and averages with the state.
    let moments = opt.moments_f32();
    for (got, want) in moments[..p.len()].iter().zip(&b) {
        assert!((f64::from(*got) - want).abs() < 1e-5);
    }
}
