//! The host's figures for GetSummary: CPUs, memory and load average, read through sysinfo
//! when the summary is asked for.

use std::sync::Mutex;

use agentd_proto::v1 as pb;
use sysinfo::{CpuRefreshKind, System};

const MIB: f64 = 1024.0 * 1024.0;

pub struct Host {
    /// sysinfo keeps what it read between refreshes; only memory is read again.
    system: Mutex<Option<System>>,
}

impl Host {
    pub fn new() -> Host {
        let system = System::new().ok().map(|mut system| {
            system.refresh_cpu_list(CpuRefreshKind::nothing());
            system
        });
        Host {
            system: Mutex::new(system),
        }
    }

    /// The figures now; zeros for what this platform does not tell.
    pub fn figures(&self) -> pb::Host {
        let mut host = pb::Host::default();
        let mut system = match self.system.lock() {
            Ok(system) => system,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(system) = system.as_mut() {
            system.refresh_memory();
            host.cpus = u32::try_from(system.cpus().len()).unwrap_or(u32::MAX);
            host.memory_total_mb = system.total_memory() as f64 / MIB;
            host.memory_available_mb = system.available_memory() as f64 / MIB;
        }
        if let Ok(load) = System::load_average() {
            host.load_average_1m = load.one;
            host.load_average_5m = load.five;
            host.load_average_15m = load.fifteen;
        }
        host
    }
}
