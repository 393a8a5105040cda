//! The pod's sandbox budget, shared by all of its Stores: one memory limit for the whole pod
//! (`resources.limits.memory` summed over its containers, the node's default for a container
//! without one) charged with the Stores' linear memories and the host memory their guests
//! drive ([`HostMemory`]), and one CPU quota
//! (`resources.limits.cpu`), enforced CFS-style over 100 ms periods with epoch interruption.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::EPOCH_TICK;

/// CFS period: a pod limited to `cpu: 200m` runs at most 20 ms of every 100 ms.
pub const CPU_PERIOD: Duration = Duration::from_millis(100);

/// The error a guest traps with when the pod's memory budget would be exceeded; the runner
/// turns it into `OOMKilled`.
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded: the pod's limit is {limit} bytes, {used} in use, growth by {wanted} refused")]
pub struct MemoryLimitExceeded {
    pub limit: usize,
    pub used: usize,
    pub wanted: usize,
}

/// Budget shared by all Stores of one pod.
#[derive(Debug)]
pub struct PodBudget {
    /// `None` = no memory limit (the per-instance pool limit still applies).
    memory_limit: Option<usize>,
    memory_used: AtomicUsize,
    /// CPU quota per period in microseconds; `None` = unlimited.
    cpu_quota_us: Option<u64>,
    cpu: Mutex<CpuPeriod>,
    cpu_used_total_us: AtomicU64,
    throttled_periods: AtomicU64,
    /// Set when the pod is terminating: running guests are interrupted at the next tick.
    killed: AtomicBool,
}

#[derive(Debug)]
struct CpuPeriod {
    start: Instant,
    used_us: u64,
}

impl PodBudget {
    pub fn new(memory_limit: Option<usize>, cpu_millis: Option<u64>) -> Arc<PodBudget> {
        Arc::new(PodBudget {
            memory_limit,
            memory_used: AtomicUsize::new(0),
            cpu_quota_us: cpu_millis.map(|m| (CPU_PERIOD.as_micros() as u64 * m / 1000).max(1)),
            cpu: Mutex::new(CpuPeriod {
                start: Instant::now(),
                used_us: 0,
            }),
            cpu_used_total_us: AtomicU64::new(0),
            throttled_periods: AtomicU64::new(0),
            killed: AtomicBool::new(false),
        })
    }

    pub fn memory_limit(&self) -> Option<usize> {
        self.memory_limit
    }
    pub fn memory_used(&self) -> usize {
        self.memory_used.load(Ordering::Relaxed)
    }
    pub fn cpu_used(&self) -> Duration {
        Duration::from_micros(self.cpu_used_total_us.load(Ordering::Relaxed))
    }
    pub fn throttled_periods(&self) -> u64 {
        self.throttled_periods.load(Ordering::Relaxed)
    }
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Relaxed);
    }

    fn try_grow(&self, by: usize) -> Result<(), MemoryLimitExceeded> {
        let Some(limit) = self.memory_limit else {
            self.memory_used.fetch_add(by, Ordering::Relaxed);
            return Ok(());
        };
        let mut cur = self.memory_used.load(Ordering::Relaxed);
        loop {
            if cur.saturating_add(by) > limit {
                return Err(MemoryLimitExceeded {
                    limit,
                    used: cur,
                    wanted: by,
                });
            }
            match self.memory_used.compare_exchange_weak(
                cur,
                cur + by,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    fn release(&self, bytes: usize) {
        self.memory_used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Charges one epoch tick to the pod (called from the epoch-deadline callback, i.e. after
    /// a guest of this pod ran for about one tick without returning to the host). `Ok(None)`:
    /// the quota allows more this period; `Ok(Some(end))`: the quota is spent and the pod is
    /// throttled until `end`; `Err`: the pod is being killed. What the guest does next is the
    /// node's CPU gate's decision ([`super::cpu`]).
    pub fn charge_tick(&self) -> wasmtime::Result<Option<Instant>> {
        if self.killed.load(Ordering::Relaxed) {
            return Err(wasmtime::Error::msg("killed: the pod is terminating"));
        }
        let tick_us = EPOCH_TICK.as_micros() as u64;
        self.cpu_used_total_us.fetch_add(tick_us, Ordering::Relaxed);
        let Some(quota) = self.cpu_quota_us else {
            return Ok(None);
        };
        let now = Instant::now();
        let mut p = self.cpu.lock().expect("cpu period lock");
        if now.duration_since(p.start) >= CPU_PERIOD {
            p.start = now;
            p.used_us = 0;
        }
        p.used_us += tick_us;
        if p.used_us < quota {
            return Ok(None);
        }
        // Quota spent: throttled until the period ends.
        let wake = p.start + CPU_PERIOD;
        drop(p);
        self.throttled_periods.fetch_add(1, Ordering::Relaxed);
        Ok(Some(wake))
    }

    /// How many of the pod's guests may compute at once: `ceil(limits.cpu)` cores, or
    /// `unlimited` without a CPU limit.
    pub fn cpu_runners(&self, unlimited: usize) -> usize {
        match self.cpu_quota_us {
            Some(q) => q.div_ceil(CPU_PERIOD.as_micros() as u64).max(1) as usize,
            None => unlimited,
        }
    }
}

/// The `ResourceLimiter` of one Store: charges its memories to the pod's budget and gives the
/// bytes back when the Store is dropped.
pub struct StoreLimiter {
    budget: Arc<PodBudget>,
    charged: usize,
    max_instance_memory: usize,
}

impl StoreLimiter {
    pub fn new(budget: Arc<PodBudget>, max_instance_memory: usize) -> Self {
        StoreLimiter {
            budget,
            charged: 0,
            max_instance_memory,
        }
    }
}

impl Drop for StoreLimiter {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

/// Host memory a guest drives (wasi:http header maps and the handles that hold them, see
/// [`super::fields`]), charged to the pod's memory budget next to its linear memories: what
/// one Store holds, set as a whole each time it is measured, given back when dropped.
#[derive(Debug)]
pub struct HostMemory {
    budget: Arc<PodBudget>,
    charged: usize,
}

impl HostMemory {
    pub fn new(budget: Arc<PodBudget>) -> Self {
        HostMemory { budget, charged: 0 }
    }

    pub fn charged(&self) -> usize {
        self.charged
    }

    /// Grows the charge by `by`, or refuses if the pod's budget cannot hold it.
    pub fn grow(&mut self, by: usize) -> Result<(), MemoryLimitExceeded> {
        self.budget.try_grow(by)?;
        self.charged += by;
        Ok(())
    }

    /// Sets the charge to `bytes` (a fresh measurement): less gives the difference back, more
    /// must fit in the budget.
    pub fn set(&mut self, bytes: usize) -> Result<(), MemoryLimitExceeded> {
        if bytes <= self.charged {
            self.budget.release(self.charged - bytes);
            self.charged = bytes;
            Ok(())
        } else {
            self.grow(bytes - self.charged)
        }
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

impl wasmtime::ResourceLimiter for StoreLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_instance_memory {
            return Err(MemoryLimitExceeded {
                limit: self.max_instance_memory,
                used: current,
                wanted: desired - current,
            }
            .into());
        }
        let by = desired.saturating_sub(current);
        self.budget.try_grow(by)?;
        self.charged += by;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }

    fn instances(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        16
    }
    fn tables(&self) -> usize {
        64
    }
}

/// True if `err` (a trap from a guest call) was caused by the pod's memory limit.
pub fn is_oom(err: &wasmtime::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<MemoryLimitExceeded>().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn pod_budget_is_shared_and_released() {
        let b = PodBudget::new(Some(100), None);
        let mut a = StoreLimiter::new(b.clone(), 1000);
        let mut c = StoreLimiter::new(b.clone(), 1000);
        assert!(a.memory_growing(0, 60, None).unwrap());
        let err = c.memory_growing(0, 50, None).unwrap_err();
        assert!(is_oom(&err));
        assert!(c.memory_growing(0, 40, None).unwrap());
        assert_eq!(b.memory_used(), 100);
        drop(a);
        assert_eq!(b.memory_used(), 40);
        drop(c);
        assert_eq!(b.memory_used(), 0);
    }

    #[test]
    fn host_memory_is_charged_and_given_back() {
        let b = PodBudget::new(Some(100), None);
        let mut h = HostMemory::new(b.clone());
        h.grow(30).unwrap();
        h.set(80).unwrap();
        assert_eq!(b.memory_used(), 80);
        assert!(h.set(101).is_err());
        assert!(h.grow(21).is_err());
        h.set(10).unwrap();
        assert_eq!((h.charged(), b.memory_used()), (10, 10));
        drop(h);
        assert_eq!(b.memory_used(), 0);
    }

    #[test]
    fn per_instance_cap() {
        let b = PodBudget::new(None, None);
        let mut a = StoreLimiter::new(b, 10);
        assert!(is_oom(&a.memory_growing(0, 11, None).unwrap_err()));
    }

    #[test]
    fn cpu_quota_throttles_after_budget() {
        // 100m = 10 ms per 100 ms period = 2 ticks of 5 ms.
        let b = PodBudget::new(None, Some(100));
        assert!(b.charge_tick().unwrap().is_none());
        assert!(b.charge_tick().unwrap().is_some());
        assert_eq!(b.throttled_periods(), 1);
        assert_eq!(b.cpu_runners(8), 1);
        assert_eq!(PodBudget::new(None, Some(1500)).cpu_runners(8), 2);
        let unlimited = PodBudget::new(None, None);
        assert_eq!(unlimited.cpu_runners(8), 8);
        for _ in 0..100 {
            assert!(unlimited.charge_tick().unwrap().is_none());
        }
        b.kill();
        assert!(b.charge_tick().is_err());
    }
}
