//! CPU placement facts: the CPUs this process may run on (its affinity mask,
//! as `taskset`, systemd's `CPUAffinity` or the kubelet's static CPU manager
//! set it) and the NUMA node of a CPU.
//!
//! Worker placement is computed from these by the config's validation
//! (`server.workers`, `server.cpus`); workers pin themselves to the CPU ids
//! chosen there, which are real CPU ids, never indexes.

use std::fmt;

/// CPU ids a list may name are below this (`CPU_SETSIZE`).
const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// A set of CPU ids, sorted and without duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSet(Vec<usize>);

impl CpuSet {
    /// The CPUs in `ids` (any order, duplicates ignored).
    pub fn new(ids: impl IntoIterator<Item = usize>) -> CpuSet {
        let mut v: Vec<usize> = ids.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        CpuSet(v)
    }

    /// The affinity mask of the calling thread (`sched_getaffinity`). Called
    /// before any worker pins itself, on a thread that never pins itself, it
    /// is the process's mask. Where the mask cannot be read, CPUs
    /// `0..available_parallelism`.
    pub fn of_process() -> CpuSet {
        // core_affinity reads sched_getaffinity(0) and lists the CPU ids set
        // in the mask (not a count).
        if let Some(ids) = core_affinity::get_core_ids() {
            let set = CpuSet::new(ids.into_iter().map(|c| c.id));
            if !set.is_empty() {
                return set;
            }
        }
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        CpuSet::new(0..n)
    }

    /// Parses a kernel CPU list such as `0-3,8,10-11` (as in
    /// `/sys/devices/system/node/nodeN/cpulist`).
    pub fn parse_list(s: &str) -> Option<CpuSet> {
        let mut ids = Vec::new();
        for part in s.trim().split(',').filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                    if a > b || b >= MAX_CPUS {
                        return None;
                    }
                    ids.extend(a..=b);
                }
                None => ids.push(part.trim().parse().ok()?),
            }
        }
        Some(CpuSet::new(ids))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, cpu: usize) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }

    /// The CPU ids, ascending.
    pub fn ids(&self) -> &[usize] {
        &self.0
    }

    /// The default placement: worker `i` on the `i`-th CPU of the set
    /// (wrapping around when there are more workers than CPUs).
    pub fn placement(&self, workers: usize) -> Vec<usize> {
        if self.0.is_empty() {
            return vec![];
        }
        (0..workers).map(|i| self.0[i % self.0.len()]).collect()
    }
}

/// As the kernel and `taskset -c` spell it: `0-3,8,10-11`.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// The CPUs a process may use: the ids in its affinity mask, and how many
/// of them it may keep busy (`usable`: the mask's size, lowered by a cgroup
/// CPU quota such as a Kubernetes CPU limit without the static CPU manager).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuBudget {
    pub set: CpuSet,
    pub usable: usize,
}

impl CpuBudget {
    /// This process's, read now (see [`CpuSet::of_process`]).
    pub fn of_process() -> CpuBudget {
        let set = CpuSet::of_process();
        let quota = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(usize::MAX);
        let usable = set.len().min(quota).max(1);
        CpuBudget { set, usable }
    }

    /// A budget of exactly `set` (tests, tools).
    pub fn of_set(set: CpuSet) -> CpuBudget {
        let usable = set.len().max(1);
        CpuBudget { set, usable }
    }
}

/// The NUMA node of `cpu`, from sysfs: the `nodeN` link in
/// `/sys/devices/system/cpu/cpuC/`, else the node whose `cpulist` holds it.
/// `None` when the kernel does not say (no NUMA support, no sysfs).
pub fn numa_node(cpu: usize) -> Option<u32> {
    numa_node_in(std::path::Path::new("/sys/devices/system"), cpu)
}

fn node_number(name: &str) -> Option<u32> {
    name.strip_prefix("node").filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
}

fn numa_node_in(sys: &std::path::Path, cpu: usize) -> Option<u32> {
    if let Ok(dir) = std::fs::read_dir(sys.join(format!("cpu/cpu{cpu}"))) {
        if let Some(n) = dir.flatten().find_map(|e| node_number(&e.file_name().to_string_lossy())) {
            return Some(n);
        }
    }
    let mut nodes: Vec<u32> = std::fs::read_dir(sys.join("node"))
        .ok()?
        .flatten()
        .filter_map(|e| node_number(&e.file_name().to_string_lossy()))
        .collect();
    nodes.sort_unstable();
    nodes.into_iter().find(|n| {
        std::fs::read_to_string(sys.join(format!("node/node{n}/cpulist")))
            .ok()
            .and_then(|l| CpuSet::parse_list(&l))
            .is_some_and(|set| set.contains(cpu))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_spelled_and_parsed_as_the_kernel_does() {
        for (ids, text) in [
            (vec![4, 5, 6, 7], "4-7"),
            (vec![1], "1"),
            (vec![0, 2, 4, 5, 6, 9], "0,2,4-6,9"),
            (vec![], ""),
            (vec![3, 1, 2, 2], "1-3"),
        ] {
            let set = CpuSet::new(ids);
            assert_eq!(set.to_string(), text);
            assert_eq!(CpuSet::parse_list(text), Some(set));
        }
        assert_eq!(CpuSet::parse_list("0-1\n"), Some(CpuSet::new([0, 1])));
        assert_eq!(CpuSet::parse_list("3-1"), None);
        assert_eq!(CpuSet::parse_list("x"), None);
    }

    #[test]
    fn default_placement_uses_the_ids_of_the_set() {
        let set = CpuSet::new([4, 5, 6, 7]);
        assert_eq!(set.placement(4), vec![4, 5, 6, 7]);
        assert_eq!(set.placement(2), vec![4, 5]);
        assert_eq!(set.placement(6), vec![4, 5, 6, 7, 4, 5], "wraps around");
        assert!(CpuSet::new([]).placement(3).is_empty());
    }

    #[test]
    fn the_process_mask_is_not_empty_and_holds_this_thread() {
        let set = CpuSet::of_process();
        assert!(!set.is_empty());
        let cpu = unsafe { libc::sched_getcpu() };
        assert!(cpu < 0 || set.contains(cpu as usize), "running on {cpu}, mask {set}");
    }

    #[test]
    fn numa_node_from_the_cpu_link_or_the_node_cpulists() {
        let dir = std::env::temp_dir().join(format!("gw-numa-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // cpu0 has its node link; cpu5 only appears in node1's cpulist.
        std::fs::create_dir_all(dir.join("cpu/cpu0/node0")).unwrap();
        std::fs::create_dir_all(dir.join("cpu/cpu0/topology")).unwrap();
        std::fs::create_dir_all(dir.join("cpu/cpu5")).unwrap();
        for (n, list) in [(0, "0-3\n"), (1, "4-7\n")] {
            std::fs::create_dir_all(dir.join(format!("node/node{n}"))).unwrap();
            std::fs::write(dir.join(format!("node/node{n}/cpulist")), list).unwrap();
        }
        std::fs::create_dir_all(dir.join("node/power")).unwrap();
        assert_eq!(numa_node_in(&dir, 0), Some(0));
        assert_eq!(numa_node_in(&dir, 5), Some(1));
        assert_eq!(numa_node_in(&dir, 9), None);
        assert_eq!(numa_node_in(&dir.join("missing"), 0), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
