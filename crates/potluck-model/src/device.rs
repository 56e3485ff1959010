//! Where the model computes: the CPU, or a CUDA GPU when the `cuda` feature is built in.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A compute device a user can name: `cpu` or `cuda` (`cuda:N` for the N-th GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The tch device, checking that CUDA is really there when asked for.
    pub fn tch(self) -> Result<tch::Device, Error> {
        match self {
            Device::Cpu => Ok(tch::Device::Cpu),
            Device::Cuda(i) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Config(
                        "this binary was built without CUDA: rebuild with `make build CUDA=1` \
                         (installs the full torch wheel and enables the `cuda` feature)"
                            .into(),
                    ));
                }
                let n = tch::Cuda::device_count();
                if i as i64 >= n {
                    return Err(Error::Config(format!(
                        "cuda:{i} asked for, but libtorch sees {n} CUDA device(s)"
                    )));
                }
                Ok(tch::Device::Cuda(i))
            }
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device, Error> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::Config(format!("unknown device {s:?}: use cpu, cuda or cuda:N"))
                }),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
        assert!("gpu".parse::<Device>().is_err());
        assert_eq!(Device::Cpu.tch().unwrap(), tch::Device::Cpu);
    }
}
