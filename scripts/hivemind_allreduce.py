"""hivemind's DecentralizedAverager on N local peers: the reference for `potluck bench allreduce`.

Run by scripts/compare-hivemind.sh inside a virtualenv that holds hivemind; prints one JSON
object: the wall time of every round (the slowest peer's, from the moment every peer's group
was formed to its averaged result: matchmaking excluded, as in ../shared/ANCHORS.md), the
median over the measured rounds, the largest error against the true mean, and each peer's peak
resident set (its main process and its averager process).

    python scripts/hivemind_allreduce.py --peers 2 --numel 16777216 --rounds 6 --warmup 1
"""

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import sys
import time


def vm_hwm_mib(pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def compression(name):
    from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

    return {
        "none": NoCompression(),
        "fp16": Float16Compression(),
        "uniform8": Uniform8BitQuantization(),
    }[name]


def initial(torch, rank, numel):
    # Peer r holds (r + 1) / 4 plus a ramp every peer shares: the mean is known in closed form.
    ramp = (torch.arange(numel, dtype=torch.float32) % 1024) * 1e-3
    return ramp + (rank + 1) * 0.25


def peer(rank, args, barrier, addrs, results):
    # A spawned child inherits "spawn"; hivemind's DHT and averager processes are forked.
    mp.set_start_method("fork", force=True)
    import torch
    import hivemind
    from hivemind.averaging.control import AveragingStage

    torch.set_num_threads(1)
    host = ["/ip4/127.0.0.1/tcp/0"]
    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=host)
        for _ in range(args.peers - 1):
            addrs.put([str(a) for a in dht.get_visible_maddrs()])
    else:
        dht = hivemind.DHT(start=True, host_maddrs=host, initial_peers=addrs.get(timeout=120))
    tensor = initial(torch, rank, args.numel)
    averager = hivemind.averaging.DecentralizedAverager(
        [tensor],
        dht,
        start=True,
        prefix="bench",
        target_group_size=args.peers,
        min_group_size=args.peers,
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        compression=compression(args.codec),
    )
    n = args.peers
    want = initial(torch, 0, args.numel) - 0.25 + (n + 1) * 0.5 * 0.25
    barrier.wait(timeout=300)
    for r in range(args.warmup + args.rounds):
        with averager.get_tensors() as tensors:
            tensors[0].copy_(initial(torch, rank, args.numel))
        control = averager.step(wait=False, require_trigger=True, timeout=300)
        # The group forms first (matchmaking, not timed); then every peer starts at once.
        while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
            time.sleep(0.005)
        barrier.wait(timeout=300)
        start = time.perf_counter()
        control.allow_allreduce()
        outcome = control.result(timeout=600)
        wall = time.perf_counter() - start
        with averager.get_tensors() as tensors:
            error = float((tensors[0] - want).abs().max())
        results.put(
            {
                "rank": rank,
                "round": r,
                "wall_s": wall,
                "ok": outcome is not None,
                "max_error": error,
            }
        )
        barrier.wait(timeout=600)
    rss = {"main_mib": vm_hwm_mib(), "averager_mib": vm_hwm_mib(averager.pid)}
    results.put({"rank": rank, "rss": rss})
    barrier.wait(timeout=120)
    averager.shutdown()
    dht.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--numel", type=int, default=16 << 20)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--codec", default="none", choices=["none", "fp16", "uniform8"])
    args = p.parse_args()
    # hivemind's DHT and averager are processes of their own: peers are spawned, not forked
    # daemons (a daemon process cannot have children).
    ctx = mp.get_context("spawn")
    barrier, addrs, results = ctx.Barrier(args.peers), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=peer, args=(r, args, barrier, addrs, results)) for r in range(args.peers)]
    for proc in procs:
        proc.start()
    rounds = {}
    rss = {}
    expected = args.peers * (args.warmup + args.rounds + 1)
    deadline = time.monotonic() + 1800
    while expected > 0:
        try:
            msg = results.get(timeout=1)
        except queue.Empty:
            dead = [r for r, proc in enumerate(procs) if proc.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for proc in procs:
                    proc.kill()
                sys.exit(f"hivemind peers {dead} failed (their errors are above)" if dead else "timed out")
            continue
        expected -= 1
        if "rss" in msg:
            rss[msg["rank"]] = msg["rss"]
        else:
            rounds.setdefault(msg["round"], []).append(msg)
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    walls, errors, failed = [], [], 0
    for r in sorted(rounds):
        if r < args.warmup:
            continue
        walls.append(max(m["wall_s"] for m in rounds[r]))
        errors.append(max(m["max_error"] for m in rounds[r]))
        failed += sum(not m["ok"] for m in rounds[r])
    out = {
        "peers": args.peers,
        "numel": args.numel,
        "codec": args.codec,
        "rounds_s": walls,
        "median_wall_s": statistics.median(walls),
        "max_error": max(errors),
        "failed_steps": failed,
        "peak_rss_mib": [rss.get(r) for r in range(args.peers)],
    }
    print(json.dumps(out))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
