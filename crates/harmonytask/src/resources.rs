//! Resource budgets and costs: CPU, RAM, GPU (fractional) and storage.
//!
//! The public type uses natural units (`f64` CPUs and GPUs, bytes); the scheduler accounts in
//! integer thousandths ([`Amounts`]) so that reserving and releasing fractional costs never
//! drifts: ten tasks of 0.1 GPU fill exactly one GPU.

use std::fmt;
use std::str::FromStr;

/// An amount of each resource: a node's budget, or one task's cost.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    /// Logical CPUs.
    pub cpu: f64,
    /// RAM in bytes.
    pub ram: u64,
    /// GPUs (fractional: 0.5 is half a GPU).
    pub gpu: f64,
    /// Scratch storage in bytes.
    pub storage: u64,
}

/// Largest CPU or GPU amount accepted (anything above is a typo, not a machine).
pub const UNITS_MAX: f64 = 1_000_000.0;

/// Largest RAM or storage amount accepted, bytes (1 EiB): more is not a real cost or budget.
pub const BYTES_MAX: u64 = 1 << 60;

impl Resources {
    /// A cost or budget of CPUs, RAM bytes and GPUs.
    pub fn new(cpu: f64, ram: u64, gpu: f64) -> Self {
        Resources {
            cpu,
            ram,
            gpu,
            storage: 0,
        }
    }

    /// Checks that every amount is finite, non-negative and plausible.
    pub fn validate(&self) -> Result<(), CostError> {
        let err = |resource, problem| Err(CostError { resource, problem });
        for (resource, v) in [(Resource::Cpu, self.cpu), (Resource::Gpu, self.gpu)] {
            if !v.is_finite() || v < 0.0 {
                return err(resource, format!("must be a non-negative number, got {v}"));
            }
            if v > UNITS_MAX {
                return err(
                    resource,
                    format!("{v} is absurdly large (the limit is {UNITS_MAX})"),
                );
            }
        }
        // 1 EiB of RAM or storage per task is not a real cost.
        for (resource, v) in [(Resource::Ram, self.ram), (Resource::Storage, self.storage)] {
            if v > BYTES_MAX {
                return err(
                    resource,
                    format!("{} is absurdly large (the limit is 1 EiB)", format_bytes(v)),
                );
            }
        }
        Ok(())
    }

    /// In scheduler units.
    pub fn amounts(&self) -> Amounts {
        Amounts {
            cpu: to_milli(self.cpu),
            ram: self.ram,
            gpu: to_milli(self.gpu),
            storage: self.storage,
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {}, ram {}, gpu {}",
            trim_float(self.cpu),
            format_bytes(self.ram),
            trim_float(self.gpu)
        )?;
        if self.storage > 0 {
            write!(f, ", storage {}", format_bytes(self.storage))?;
        }
        Ok(())
    }
}

fn to_milli(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        (v * 1000.0).round() as u64
    } else {
        0
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// An amount of a [`Resources`] value (a budget or a cost) out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{resource} {problem}")]
#[non_exhaustive]
pub struct CostError {
    /// The amount.
    pub resource: Resource,
    /// What is wrong with it, as a phrase that follows the resource's name (or a field naming
    /// it, such as `cost.cpu:`).
    pub problem: String,
}

/// Which resource a shortfall is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    /// CPUs.
    Cpu,
    /// RAM.
    Ram,
    /// GPUs.
    Gpu,
    /// Storage.
    Storage,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Cpu => "cpu",
            Resource::Ram => "ram",
            Resource::Gpu => "gpu",
            Resource::Storage => "storage",
        })
    }
}

/// Resources in integer scheduler units: milli-CPUs, bytes, milli-GPUs, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Amounts {
    /// Milli-CPUs.
    pub cpu: u64,
    /// Bytes of RAM.
    pub ram: u64,
    /// Milli-GPUs.
    pub gpu: u64,
    /// Bytes of storage.
    pub storage: u64,
}

impl Amounts {
    fn pairs(&self) -> [(Resource, u64); 4] {
        [
            (Resource::Cpu, self.cpu),
            (Resource::Ram, self.ram),
            (Resource::Gpu, self.gpu),
            (Resource::Storage, self.storage),
        ]
    }

    /// Component-wise `self × n` (saturating).
    pub fn times(&self, n: u64) -> Amounts {
        Amounts {
            cpu: self.cpu.saturating_mul(n),
            ram: self.ram.saturating_mul(n),
            gpu: self.gpu.saturating_mul(n),
            storage: self.storage.saturating_mul(n),
        }
    }

    /// Component-wise sum (saturating).
    pub fn plus(&self, o: &Amounts) -> Amounts {
        Amounts {
            cpu: self.cpu.saturating_add(o.cpu),
            ram: self.ram.saturating_add(o.ram),
            gpu: self.gpu.saturating_add(o.gpu),
            storage: self.storage.saturating_add(o.storage),
        }
    }

    /// Component-wise difference, floored at zero.
    pub fn minus(&self, o: &Amounts) -> Amounts {
        Amounts {
            cpu: self.cpu.saturating_sub(o.cpu),
            ram: self.ram.saturating_sub(o.ram),
            gpu: self.gpu.saturating_sub(o.gpu),
            storage: self.storage.saturating_sub(o.storage),
        }
    }

    /// Whether every component is ≤ the other's.
    pub fn fits_in(&self, o: &Amounts) -> bool {
        self.cpu <= o.cpu && self.ram <= o.ram && self.gpu <= o.gpu && self.storage <= o.storage
    }

    /// How many tasks of cost `self` fit in `free`, and, when none does, the first resource
    /// that is short. A zero cost fits without limit (`u64::MAX`).
    pub fn how_many_fit(&self, free: &Amounts) -> (u64, Option<Resource>) {
        let mut n = u64::MAX;
        for ((resource, cost), (_, avail)) in self.pairs().into_iter().zip(free.pairs()) {
            if cost == 0 {
                continue;
            }
            let fit = avail / cost;
            if fit == 0 {
                return (0, Some(resource));
            }
            n = n.min(fit);
        }
        (n, None)
    }

    /// One component.
    pub fn get(&self, r: Resource) -> u64 {
        match r {
            Resource::Cpu => self.cpu,
            Resource::Ram => self.ram,
            Resource::Gpu => self.gpu,
            Resource::Storage => self.storage,
        }
    }

    /// Back to natural units.
    pub fn to_resources(&self) -> Resources {
        Resources {
            cpu: self.cpu as f64 / 1000.0,
            ram: self.ram,
            gpu: self.gpu as f64 / 1000.0,
            storage: self.storage,
        }
    }
}

/// Formats one component of scheduler units for humans ("54 GiB", "1.5").
pub fn format_amount(r: Resource, v: u64) -> String {
    match r {
        Resource::Cpu | Resource::Gpu => trim_float(v as f64 / 1000.0),
        Resource::Ram | Resource::Storage => format_bytes(v),
    }
}

/// Formats a byte count with binary units ("54 GiB", "128 MiB", "512 B").
pub fn format_bytes(v: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = v as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v} B")
    } else {
        format!(
            "{} {}",
            trim_float((value * 100.0).round() / 100.0),
            UNITS[unit]
        )
    }
}

/// A byte size parsed from text: `4GiB`, `512MiB`, `1.5 GB`, `1073741824`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let number: f64 = num.parse().map_err(|_| {
            format!("invalid size {s:?}: expected a number with an optional unit such as 4GiB")
        })?;
        let factor: f64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "t" | "tb" => 1e12,
            "ki" | "kib" => 1024.0,
            "mi" | "mib" => 1024.0 * 1024.0,
            "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            _ => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
                ));
            }
        };
        let bytes = number * factor;
        if !bytes.is_finite() || bytes < 0.0 || bytes > (1u64 << 60) as f64 {
            return Err(format!("invalid size {s:?}: out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

/// The machine's resources as detected: logical CPUs available to this process, total RAM,
/// and NVIDIA GPUs through NVML when its library is present (0 otherwise, never an error).
pub fn detect() -> Resources {
    let cpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ram = match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_memory();
            sys.total_memory()
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the machine's memory size; set the RAM budget explicitly");
            0
        }
    };
    Resources {
        cpu,
        ram,
        gpu: detect_gpus() as f64,
        storage: 0,
    }
}

/// Number of NVIDIA GPUs NVML reports; 0 when the library or driver is missing.
pub fn detect_gpus() -> u32 {
    match nvml_wrapper::Nvml::init() {
        Ok(nvml) => nvml.device_count().unwrap_or(0),
        Err(e) => {
            tracing::debug!(error = %e, "NVML not available; assuming no GPUs");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!("4GiB".parse::<ByteSize>().unwrap().0, 4 << 30);
        assert_eq!("64 GiB".parse::<ByteSize>().unwrap().0, 64 << 30);
        assert_eq!("1.5GB".parse::<ByteSize>().unwrap().0, 1_500_000_000);
        assert_eq!("512".parse::<ByteSize>().unwrap().0, 512);
        let e = "12XB".parse::<ByteSize>().unwrap_err();
        assert!(e.contains("unknown unit \"XB\""), "{e}");
        assert!("GiB".parse::<ByteSize>().is_err());
        assert!("-1GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn fractional_gpu_fills_exactly() {
        let budget = Resources::new(8.0, 0, 1.0).amounts();
        let cost = Resources::new(0.0, 0, 0.1).amounts();
        assert_eq!(cost.how_many_fit(&budget), (10, None));
        let used = cost.times(10);
        assert!(used.fits_in(&budget));
        assert_eq!(budget.minus(&used).gpu, 0);
    }

    #[test]
    fn shortfall_names_the_resource() {
        let free = Resources::new(8.0, 12 << 30, 0.0).amounts();
        let sdr = Resources::new(4.0, 54 << 30, 0.0).amounts();
        assert_eq!(sdr.how_many_fit(&free), (0, Some(Resource::Ram)));
        let trees = Resources::new(1.0, 8 << 30, 1.0).amounts();
        assert_eq!(trees.how_many_fit(&free), (0, Some(Resource::Gpu)));
        let zero = Amounts::default();
        assert_eq!(zero.how_many_fit(&free).0, u64::MAX);
        assert_eq!(format_amount(Resource::Ram, 54 << 30), "54 GiB");
    }

    #[test]
    fn validation() {
        assert!(Resources::new(-1.0, 0, 0.0).validate().is_err());
        assert!(Resources::new(f64::NAN, 0, 0.0).validate().is_err());
        assert!(Resources::new(1e12, 0, 0.0).validate().is_err());
        assert!(Resources::new(4.0, 1 << 62, 0.0).validate().is_err());
        assert!(Resources::new(4.0, 54 << 30, 0.5).validate().is_ok());
    }

    #[test]
    fn detection_does_not_fail() {
        let r = detect();
        assert!(r.cpu >= 1.0);
        assert!(r.ram > 0);
        assert!(r.gpu >= 0.0);
    }
}
