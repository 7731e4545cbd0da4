//! The accelerator table: GPU product label -> memory, compute capability and memory bandwidth.
//!
//! Product names are the values NVIDIA's GPU feature discovery writes into the `nvidia.com/gpu.product`
//! node label. Memory is what the driver reports as total (nvidia-smi), not the marketing figure, because
//! that is what an inference server can allocate from. A product missing here can be described in the
//! QuantizedModel itself (`accelerator.memory` + `accelerator.computeCapability`) or added to the table
//! with [`AcceleratorTable::insert`] (the operator's `--accelerator NAME=MEMORY,CC` flag); an accelerator
//! known to neither fails closed.

use std::collections::BTreeMap;
use std::fmt;

const MIB: u64 = 1024 * 1024;

/// CUDA compute capability (SM version), e.g. 8.9 for Ada, 9.0 for Hopper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComputeCapability {
    pub major: u8,
    pub minor: u8,
}

impl ComputeCapability {
    pub const fn new(major: u8, minor: u8) -> Self {
        ComputeCapability { major, minor }
    }
}

impl fmt::Display for ComputeCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SM{}{}", self.major, self.minor)
    }
}

impl std::str::FromStr for ComputeCapability {
    type Err = String;
    /// Parses "8.9".
    fn from_str(s: &str) -> Result<Self, String> {
        let (major, minor) = s.split_once('.').ok_or_else(|| format!("compute capability {s:?} is not MAJOR.MINOR"))?;
        let parse = |p: &str| p.parse::<u8>().map_err(|_| format!("compute capability {s:?} is not MAJOR.MINOR"));
        Ok(ComputeCapability::new(parse(major)?, parse(minor)?))
    }
}

/// One GPU product.
#[derive(Clone, Debug, PartialEq)]
pub struct Accelerator {
    /// `nvidia.com/gpu.product` label value.
    pub product: String,
    /// Total device memory in bytes as the driver reports it.
    pub memory_bytes: u64,
    /// SM version.
    pub compute_capability: ComputeCapability,
    /// Peak memory bandwidth in bytes per second (for roofline estimates); None when unknown.
    pub memory_bandwidth: Option<u64>,
}

/// Product label -> accelerator.
#[derive(Clone, Debug)]
pub struct AcceleratorTable {
    by_product: BTreeMap<String, Accelerator>,
}

impl AcceleratorTable {
    /// The products Quantfleet knows out of the box.
    pub fn builtin() -> Self {
        // (label, memory MiB as reported by the driver, compute capability, bandwidth GB/s)
        const BUILTIN: &[(&str, u64, (u8, u8), u64)] = &[
            ("Tesla-T4", 15_360, (7, 5), 320),
            ("NVIDIA-A10", 23_028, (8, 6), 600),
            ("NVIDIA-A10G", 23_028, (8, 6), 600),
            ("NVIDIA-A100-PCIE-40GB", 40_960, (8, 0), 1_555),
            ("NVIDIA-A100-SXM4-40GB", 40_960, (8, 0), 1_555),
            ("NVIDIA-A100-80GB-PCIe", 81_920, (8, 0), 1_935),
            ("NVIDIA-A100-SXM4-80GB", 81_920, (8, 0), 2_039),
            ("NVIDIA-L4", 23_034, (8, 9), 300),
            ("NVIDIA-L40S", 46_068, (8, 9), 864),
            ("NVIDIA-H100-PCIe", 81_559, (9, 0), 2_000),
            ("NVIDIA-H100-80GB-HBM3", 81_559, (9, 0), 3_350),
            ("NVIDIA-H100-NVL", 95_830, (9, 0), 3_900),
            ("NVIDIA-H200", 143_771, (9, 0), 4_800),
            ("NVIDIA-B200", 183_359, (10, 0), 8_000),
        ];
        let mut table = AcceleratorTable { by_product: BTreeMap::new() };
        for &(product, mib, (major, minor), gbps) in BUILTIN {
            table.insert(Accelerator {
                product: product.to_owned(),
                memory_bytes: mib * MIB,
                compute_capability: ComputeCapability::new(major, minor),
                memory_bandwidth: Some(gbps * 1_000_000_000),
            });
        }
        table
    }

    /// Adds or replaces a product.
    pub fn insert(&mut self, accelerator: Accelerator) {
        self.by_product.insert(accelerator.product.clone(), accelerator);
    }

    /// Looks a product up by its label value.
    pub fn get(&self, product: &str) -> Option<&Accelerator> {
        self.by_product.get(product)
    }

    /// Every known product, sorted by label.
    pub fn products(&self) -> impl Iterator<Item = &Accelerator> {
        self.by_product.values()
    }

    /// Parses a table extension `NAME=MEMORY,CC` (e.g. `ACME-X1=48Gi,8.9`), as the operator's flag takes it.
    pub fn parse_entry(entry: &str) -> Result<Accelerator, String> {
        let (product, rest) = entry
            .split_once('=')
            .ok_or_else(|| format!("accelerator {entry:?} is not NAME=MEMORY,COMPUTE_CAPABILITY"))?;
        let (memory, cc) = rest
            .split_once(',')
            .ok_or_else(|| format!("accelerator {entry:?} is not NAME=MEMORY,COMPUTE_CAPABILITY"))?;
        if product.is_empty() {
            return Err(format!("accelerator {entry:?} has an empty name"));
        }
        Ok(Accelerator {
            product: product.to_owned(),
            memory_bytes: parse_quantity(memory)?,
            compute_capability: cc.parse()?,
            memory_bandwidth: None,
        })
    }
}

/// Parses a Kubernetes memory quantity with a binary (Ki, Mi, Gi, Ti) or decimal (k, M, G, T) suffix.
pub fn parse_quantity(q: &str) -> Result<u64, String> {
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "memory quantity {q:?} has an unknown suffix {suffix:?} (use Ki, Mi, Gi, Ti, k, M, G or T)"
            ));
        }
    };
    let value: f64 = number.parse().map_err(|_| format!("memory quantity {q:?} is not a number with a suffix"))?;
    if !value.is_finite() || value <= 0.0 {
        return Err(format!("memory quantity {q:?} must be positive"));
    }
    Ok((value * multiplier as f64).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_the_products_the_issue_names() {
        let t = AcceleratorTable::builtin();
        for p in [
            "Tesla-T4",
            "NVIDIA-A10",
            "NVIDIA-A100-SXM4-40GB",
            "NVIDIA-A100-SXM4-80GB",
            "NVIDIA-L4",
            "NVIDIA-L40S",
            "NVIDIA-H100-80GB-HBM3",
            "NVIDIA-H200",
            "NVIDIA-B200",
        ] {
            assert!(t.get(p).is_some(), "{p} missing");
        }
        let h100 = t.get("NVIDIA-H100-80GB-HBM3").unwrap();
        assert_eq!(h100.compute_capability, ComputeCapability::new(9, 0));
        assert_eq!(h100.memory_bytes, 81_559 * MIB);
        assert_eq!(t.get("NVIDIA-L4").unwrap().compute_capability.to_string(), "SM89");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("80Gi").unwrap(), 80 << 30);
        assert_eq!(parse_quantity("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_quantity("24G").unwrap(), 24_000_000_000);
        assert_eq!(parse_quantity("1024").unwrap(), 1024);
        assert!(parse_quantity("80GB").unwrap_err().contains("unknown suffix"));
        assert!(parse_quantity("Gi").is_err());
        assert!(parse_quantity("0Gi").is_err());
    }

    #[test]
    fn table_extension_entries() {
        let a = AcceleratorTable::parse_entry("ACME-X1=48Gi,8.9").unwrap();
        assert_eq!(a.memory_bytes, 48 << 30);
        assert_eq!(a.compute_capability, ComputeCapability::new(8, 9));
        let mut t = AcceleratorTable::builtin();
        t.insert(a);
        assert!(t.get("ACME-X1").is_some());
        assert!(AcceleratorTable::parse_entry("ACME-X1=48Gi").is_err());
        assert!(AcceleratorTable::parse_entry("ACME-X1=48Gi,eight").is_err());
        assert!(AcceleratorTable::parse_entry("=48Gi,8.9").is_err());
    }
}
