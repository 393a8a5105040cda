//! Who may run guest code right now: the node's CPU gate.
//!
//! Guests run on the agent's tokio workers, which cannot preempt a task; a guest gives its
//! thread back only at an epoch callback (every [`EPOCH_TICK`]). Without a gate, every
//! CPU-bound guest on the node is runnable at once: 20 spinning requests of a pod limited to
//! `500m` all wake at the start of each CFS period, each runs a full tick before the pod's
//! quota is checked again (20 ticks = twice the quota in one burst), and a neighbour's request
//! waits behind them in the workers' run queues (issue 11 item 12).
//!
//! The gate bounds that queue:
//! - **A guest is CPU-bound from its second epoch callback on** (it ran a whole tick without
//!   returning to the host; the first callback may just be a short call straddling a tick),
//!   or from its first if its pod already has CPU-bound guests. Until then it runs ungated,
//!   so ordinary requests of a pod that does not spin never touch the gate. (A long-lived
//!   command stays "CPU-bound" once it was: its later short bursts go through the gate too.
//!   Telling "back from the host" from "yielded and waited for a worker" needs the resume
//!   time of every yield; not done yet.)
//! - **At most `slots` CPU-bound guests run at once on the node** (`--guest-cpu-slots`,
//!   default one less than the cores, at least 1): the remaining worker stays free for short
//!   requests, the proxy, DNS, heartbeats and, under `wasmctl up`, the control plane — the
//!   guest-side equivalent of kube's `system-reserved`.
//! - **At most `ceil(limits.cpu)` of them per pod** (a pod limited to `500m` runs one guest at a
//!   time; an unlimited pod up to `slots`), so a pod's quota is spent by a bounded number of
//!   runners instead of a burst of all of them.
//! - **Waiters are parked**, not polled: each waits on its own `Notify` and is woken only when
//!   it is handed a slot. Slots go round-robin over pods (a pod with 20 spinners does not get
//!   20 times the share of a pod with one), first-come within a pod, and a running guest hands
//!   its slot on at its next tick when someone waits (a time slice of one tick).
//! - **A throttled pod stops computing**: the guest whose tick spent the quota releases its
//!   slot and sleeps to the end of the period, then queues again before it resumes; the pod's
//!   waiters get no slot before the period ends (the epoch thread dispatches them then), so
//!   throttled guests neither run a tick each past the quota nor wake as a burst.
//! - **A holder that stopped computing** (it returned to the host and waits for I/O, e.g. a
//!   command in `accept`) does not tick any more; the epoch thread's [`CpuGate::reap`] takes
//!   back a slot whose holder has not ticked for [`STALE_TICKS`] while others wait. If that
//!   holder computes again, its next tick finds it without a slot and it queues.
//!
//! Bound: with `S` slots on `C` workers (`S < C`), at most `S` CPU-bound guests are runnable
//! at any time, however many spin on the node, so `C − S` workers only ever run short tasks: a
//! request that is not CPU-bound waits behind the spinners only for what runs before the gate
//! applies (each new guest's slice up to its first epoch check). A pod's CPU per period is at
//! most its quota plus one tick per runner (`ceil(limits.cpu)` runners), plus one ungated tick
//! for a guest of a pod that had no CPU-bound guest yet. Measured in BENCHMARKS.md (isolation).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;
use wasmtime::UpdateDeadline;

use super::limits::PodBudget;
#[cfg(doc)]
use super::EPOCH_TICK;

/// A holder that has not ticked for this many epochs is taken to be waiting on the host.
pub const STALE_TICKS: u64 = 3;

/// The node-wide gate (one per [`super::Runtime`]).
#[derive(Debug)]
pub struct CpuGate {
    slots: usize,
    state: Mutex<GateState>,
    /// Guests parked in the gate (lets [`CpuGate::reap`] skip the lock when there are none).
    waiting: AtomicUsize,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct GateState {
    /// Advanced by [`CpuGate::reap`] once per epoch.
    tick: u64,
    running: usize,
    /// Runner id → its pod and the gate tick it last ticked at.
    holders: HashMap<u64, Holder>,
    pods: HashMap<u64, PodQueue>,
    /// Pods with waiters, in round-robin order (each at most once).
    ring: VecDeque<u64>,
}

#[derive(Debug)]
struct Holder {
    pod: u64,
    last_tick: u64,
    /// It runs with its slot (false between being handed the slot and resuming: a guest
    /// that waits for a worker is not stale).
    resumed: bool,
}

#[derive(Debug)]
struct PodQueue {
    limit: usize,
    running: usize,
    waiters: VecDeque<(u64, Arc<Notify>)>,
    /// The pod spent its quota: none of its waiters gets a slot before this.
    throttled_until: Option<Instant>,
}

impl CpuGate {
    pub fn new(slots: usize) -> Arc<CpuGate> {
        Arc::new(CpuGate {
            slots: slots.max(1),
            state: Mutex::new(GateState::default()),
            waiting: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        })
    }

    /// The default number of slots: one less than the cores this process may use, at least 1.
    pub fn default_slots() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .saturating_sub(1)
            .max(1)
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// A new id for a pod (its guests share its per-pod limit).
    pub fn pod_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The gate's handle for one Store of pod `pod`, which may run `limit` guests at once.
    pub fn runner(self: &Arc<Self>, pod: u64, limit: usize) -> Runner {
        Runner {
            gate: self.clone(),
            ticket: Ticket {
                pod,
                limit: limit.clamp(1, self.slots),
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                notify: Arc::new(Notify::new()),
            },
            callbacks: 0,
        }
    }

    /// Guests parked in the gate right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// CPU-bound guests holding a slot right now.
    pub fn running(&self) -> usize {
        self.state.lock().expect("cpu gate lock").running
    }

    /// Called by the epoch thread after every tick: advances the gate's clock and, while
    /// guests wait, takes slots back from holders that stopped ticking.
    pub fn reap(&self) {
        let mut st = self.state.lock().expect("cpu gate lock");
        st.tick += 1;
        if self.waiting.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = st.tick;
        let stale: Vec<u64> = st
            .holders
            .iter()
            .filter(|(_, h)| h.resumed && h.last_tick + STALE_TICKS < now)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            st.release(id);
        }
        self.dispatch(&mut st);
    }

    /// Hands free slots to waiters, round-robin over pods.
    fn dispatch(&self, st: &mut GateState) {
        let now = Instant::now();
        let mut skipped = 0;
        while st.running < self.slots && skipped < st.ring.len() {
            let Some(pod) = st.ring.pop_front() else {
                break;
            };
            let Some(q) = st.pods.get_mut(&pod) else {
                continue;
            };
            if q.running >= q.limit || q.throttled_until.is_some_and(|t| now < t) {
                st.ring.push_back(pod);
                skipped += 1;
                continue;
            }
            let Some((id, notify)) = q.waiters.pop_front() else {
                continue;
            };
            q.running += 1;
            let more = !q.waiters.is_empty();
            st.running += 1;
            let tick = st.tick;
            st.holders.insert(
                id,
                Holder {
                    pod,
                    last_tick: tick,
                    resumed: false,
                },
            );
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            if more {
                st.ring.push_back(pod);
            }
            skipped = 0;
            notify.notify_one();
        }
    }

    /// One epoch callback of a Store's guest: charges the tick to the pod's quota and decides
    /// whether it keeps running, yields, waits for a slot or sleeps out its pod's period.
    pub fn on_tick(
        self: &Arc<Self>,
        runner: &mut Runner,
        budget: &PodBudget,
    ) -> wasmtime::Result<UpdateDeadline> {
        let throttled_until = budget.charge_tick()?;
        runner.callbacks = runner.callbacks.saturating_add(1);
        let mut st = self.state.lock().expect("cpu gate lock");
        if runner.callbacks < 2
            && throttled_until.is_none()
            && !st.pods.contains_key(&runner.ticket.pod)
        {
            // Its first tick, in a pod with no CPU-bound guest: maybe a short call that
            // straddled a tick. (In a pod whose guests already compute or wait, a new guest
            // queues at once: many short-lived spinning requests would otherwise each run
            // a tick past the gate.)
            return Ok(UpdateDeadline::Yield(1));
        }
        let tick = st.tick;
        if let Some(until) = throttled_until {
            // Quota spent: the pod's waiters stay parked to the end of the period (the epoch
            // thread's `reap` dispatches them then), this guest gives its slot to another
            // pod, sleeps out the period and queues again.
            if let Some(q) = st.pods.get_mut(&runner.ticket.pod) {
                q.throttled_until = Some(until);
            }
            st.release(runner.ticket.id);
            st.unqueue(runner.ticket.id, &self.waiting);
            self.dispatch(&mut st);
            drop(st);
            let wait = self.clone().acquire(runner.ticket.clone());
            return Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    tokio::time::sleep_until(until.into()).await;
                    wait.await
                }),
            ));
        }
        if let Some(h) = st.holders.get_mut(&runner.ticket.id) {
            h.last_tick = tick;
            let others_wait = st
                .ring
                .iter()
                .any(|p| st.pods.get(p).is_some_and(|q| !q.waiters.is_empty()));
            if !others_wait {
                return Ok(UpdateDeadline::Yield(1));
            }
            // A time slice is one tick: hand the slot on and queue behind the others.
            st.release(runner.ticket.id);
        }
        // Not holding a slot (new to the gate, its slot was reaped, or it just gave it up):
        // queue behind the waiters; keep running if the slot comes straight back.
        if st.take_or_queue(self, &runner.ticket) {
            return Ok(UpdateDeadline::Yield(1));
        }
        drop(st);
        Ok(UpdateDeadline::YieldCustom(
            1,
            Box::pin(self.clone().acquire(runner.ticket.clone())),
        ))
    }

    /// Resolves once `runner` holds a slot, queueing it if it neither holds nor waits (its
    /// slot may have been reaped before it resumed, or it sat out a throttled period).
    async fn acquire(self: Arc<Self>, ticket: Ticket) {
        loop {
            {
                let mut st = self.state.lock().expect("cpu gate lock");
                if st.take_or_queue(&self, &ticket) {
                    return;
                }
            }
            ticket.notify.notified().await;
        }
    }
}

impl GateState {
    /// `runner` holds a slot (marked as running from now on) → `true`; otherwise it is queued
    /// (once) and free slots are dispatched, which may hand it one at once.
    fn take_or_queue(&mut self, gate: &CpuGate, r: &Ticket) -> bool {
        if !self.holders.contains_key(&r.id) {
            self.enqueue(r.pod, r.limit, r.id, r.notify.clone(), &gate.waiting);
            gate.dispatch(self);
        }
        let tick = self.tick;
        match self.holders.get_mut(&r.id) {
            Some(h) => {
                h.resumed = true;
                h.last_tick = tick;
                true
            }
            None => false,
        }
    }

    /// Gives up `id`'s slot (no-op if it holds none).
    fn release(&mut self, id: u64) {
        let Some(h) = self.holders.remove(&id) else {
            return;
        };
        self.running -= 1;
        if let Some(q) = self.pods.get_mut(&h.pod) {
            q.running -= 1;
            if q.running == 0 && q.waiters.is_empty() {
                self.pods.remove(&h.pod);
            }
        }
    }

    fn enqueue(
        &mut self,
        pod: u64,
        limit: usize,
        id: u64,
        notify: Arc<Notify>,
        waiting: &AtomicUsize,
    ) {
        let q = self.pods.entry(pod).or_insert_with(|| PodQueue {
            limit,
            running: 0,
            waiters: VecDeque::new(),
            throttled_until: None,
        });
        if q.waiters.iter().any(|(w, _)| *w == id) {
            return;
        }
        let first = q.waiters.is_empty();
        q.waiters.push_back((id, notify));
        waiting.fetch_add(1, Ordering::Relaxed);
        if first {
            self.ring.push_back(pod);
        }
    }

    /// Takes `id` out of its pod's queue (it stopped waiting: dropped or throttled).
    fn unqueue(&mut self, id: u64, waiting: &AtomicUsize) {
        let mut emptied = None;
        for (pod, q) in self.pods.iter_mut() {
            if let Some(i) = q.waiters.iter().position(|(w, _)| *w == id) {
                q.waiters.remove(i);
                waiting.fetch_sub(1, Ordering::Relaxed);
                if q.waiters.is_empty() {
                    emptied = Some((*pod, q.running == 0));
                }
                break;
            }
        }
        if let Some((pod, idle)) = emptied {
            self.ring.retain(|p| *p != pod);
            if idle {
                self.pods.remove(&pod);
            }
        }
    }
}

/// One Store's place in the gate; dropping it (with the Store) gives back its slot or its
/// place in the queue.
#[derive(Debug)]
pub struct Runner {
    gate: Arc<CpuGate>,
    ticket: Ticket,
    /// Epoch callbacks seen so far (the gate applies from the second).
    callbacks: u32,
}

/// Who a runner is in the gate's queues; a parked guest's future holds a copy.
#[derive(Debug, Clone)]
struct Ticket {
    pod: u64,
    limit: usize,
    id: u64,
    notify: Arc<Notify>,
}

impl Runner {
    /// The Store's epoch callback.
    pub fn on_tick(&mut self, budget: &PodBudget) -> wasmtime::Result<UpdateDeadline> {
        let gate = self.gate.clone();
        gate.on_tick(self, budget)
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().expect("cpu gate lock");
        let id = self.ticket.id;
        if st.holders.contains_key(&id) {
            st.release(id);
            self.gate.dispatch(&mut st);
        } else {
            st.unqueue(id, &self.gate.waiting);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::time::{Duration, Instant};

    use futures_util::FutureExt as _;

    use super::*;

    type Parked = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// Ticks `r` once: `None` if it keeps running, `Some(future)` if it must wait.
    fn tick(r: &mut Runner, b: &PodBudget) -> Option<Parked> {
        match r.on_tick(b).expect("not killed") {
            UpdateDeadline::Yield(1) => None,
            UpdateDeadline::YieldCustom(1, f) => Some(f),
            _ => panic!("unexpected deadline update"),
        }
    }

    fn ready(f: &mut Parked) -> bool {
        f.as_mut().now_or_never().is_some()
    }

    /// A runner past its ungated first tick, holding a slot.
    fn running(gate: &Arc<CpuGate>, pod: u64, limit: usize, b: &PodBudget) -> Runner {
        let mut r = gate.runner(pod, limit);
        assert!(tick(&mut r, b).is_none(), "the first tick is ungated");
        assert!(tick(&mut r, b).is_none(), "a free slot is taken at once");
        r
    }

    #[test]
    fn cpu_bound_guests_beyond_the_slots_wait_and_take_turns() {
        let gate = CpuGate::new(1);
        let b = PodBudget::new(None, None);
        let (pa, pb) = (gate.pod_id(), gate.pod_id());
        let mut a = running(&gate, pa, 8, &b);
        let mut c = gate.runner(pb, 8);
        assert!(tick(&mut c, &b).is_none());
        let mut c_wait = tick(&mut c, &b).expect("the one slot is taken: c waits");
        assert!(!ready(&mut c_wait));
        assert_eq!((gate.running(), gate.waiting()), (1, 1));
        // a's next tick hands the slot to c and parks a.
        let mut a_wait = tick(&mut a, &b).expect("a hands its slot on");
        assert!(ready(&mut c_wait), "c was handed the slot");
        assert!(!ready(&mut a_wait));
        assert_eq!((gate.running(), gate.waiting()), (1, 1));
        // c finishes (its Store is dropped): a gets the slot back.
        drop(c);
        assert!(ready(&mut a_wait));
        assert_eq!((gate.running(), gate.waiting()), (1, 0));
        // Alone, a keeps running tick after tick.
        for _ in 0..10 {
            assert!(tick(&mut a, &b).is_none());
        }
        drop(a);
        assert_eq!((gate.running(), gate.waiting()), (0, 0));
        assert!(
            gate.state.lock().unwrap().pods.is_empty(),
            "no pod left behind"
        );
    }

    #[test]
    fn a_pod_runs_at_most_its_cpu_limit_in_guests_and_pods_take_turns() {
        let gate = CpuGate::new(2);
        let b = PodBudget::new(None, Some(500));
        let unlimited = PodBudget::new(None, None);
        let (pa, pb) = (gate.pod_id(), gate.pod_id());
        let limit = b.cpu_runners(gate.slots());
        assert_eq!(limit, 1);
        let _a1 = running(&gate, pa, limit, &b);
        let mut a2 = gate.runner(pa, limit);
        // Pod a already computes: a2 queues at its first tick (pod a is at its one runner).
        let mut a2_wait = tick(&mut a2, &b).expect("pod a is at its limit of one runner");
        assert_eq!(gate.running(), 1, "a node slot is still free");
        // Another pod takes the free node slot at once.
        let mut b1 = running(&gate, pb, 2, &unlimited);
        assert_eq!(gate.running(), 2);
        // Pod b's second guest and pod a's third queue; when b1 hands on, the ring serves pod
        // a's queue only if a is under its limit (it is not), so b's own waiter gets it.
        let mut b2 = gate.runner(pb, 2);
        let mut b2_wait = tick(&mut b2, &unlimited).expect("no node slot is free");
        let mut b1_wait = tick(&mut b1, &unlimited).expect("b1 hands on");
        assert!(ready(&mut b2_wait));
        assert!(!ready(&mut a2_wait), "pod a stays at one runner");
        assert!(!ready(&mut b1_wait));
    }

    #[test]
    fn slots_go_round_robin_over_pods() {
        let gate = CpuGate::new(1);
        let b = PodBudget::new(None, None);
        let (pa, pb, pc) = (gate.pod_id(), gate.pod_id(), gate.pod_id());
        let mut holder = running(&gate, pc, 8, &b);
        let mut waits = Vec::new();
        let mut runners = Vec::new();
        // Pod a queues three guests, then pod b one.
        for pod in [pa, pa, pa, pb] {
            let mut r = gate.runner(pod, 8);
            // The first guest of an idle pod has one ungated tick; later ones queue at once.
            let w = match tick(&mut r, &b) {
                Some(w) => w,
                None => tick(&mut r, &b).expect("queued"),
            };
            waits.push(w);
            runners.push(r);
        }
        let _holder_wait = tick(&mut holder, &b).expect("holder hands on");
        assert!(ready(&mut waits[0]), "pod a's first guest is served first");
        // a's first guest hands on at its next tick: pod b is next, not a's second guest.
        let _a_wait = tick(&mut runners[0], &b).expect("hands on");
        assert!(ready(&mut waits[3]), "pod b before pod a's second guest");
        assert!(!ready(&mut waits[1]));
    }

    #[test]
    fn a_holder_that_stopped_ticking_loses_its_slot_to_a_waiter() {
        let gate = CpuGate::new(1);
        let b = PodBudget::new(None, None);
        let mut idle = running(&gate, gate.pod_id(), 8, &b);
        let mut busy = gate.runner(gate.pod_id(), 8);
        assert!(tick(&mut busy, &b).is_none());
        let mut wait = tick(&mut busy, &b).expect("waits");
        for _ in 0..STALE_TICKS {
            gate.reap();
            assert!(!ready(&mut wait), "not stale yet");
        }
        gate.reap();
        assert!(ready(&mut wait), "the idle holder's slot was taken back");
        // When the idle guest computes again it queues instead of running beside busy.
        let mut idle_wait = tick(&mut idle, &b).expect("queues");
        assert!(!ready(&mut idle_wait));
        assert_eq!((gate.running(), gate.waiting()), (1, 1));
    }

    #[test]
    fn a_guest_handed_a_slot_keeps_it_while_it_waits_for_a_worker() {
        let gate = CpuGate::new(1);
        let b = PodBudget::new(None, None);
        let mut a = running(&gate, gate.pod_id(), 8, &b);
        let mut w = gate.runner(gate.pod_id(), 8);
        assert!(tick(&mut w, &b).is_none());
        let mut w_wait = tick(&mut w, &b).expect("waits");
        let _a_wait = tick(&mut a, &b).expect("a hands its slot to w");
        // w is not polled for a while (a busy machine): its slot is not taken back.
        for _ in 0..10 * STALE_TICKS {
            gate.reap();
        }
        assert!(ready(&mut w_wait), "w resumes with its slot");
        assert_eq!((gate.running(), gate.waiting()), (1, 1));
    }

    #[tokio::test]
    async fn a_throttled_pods_waiters_stay_parked_until_its_period_ends() {
        let gate = CpuGate::new(2);
        // 300m: 30 ms per period, six ticks.
        let b = PodBudget::new(None, Some(300));
        let pod = gate.pod_id();
        let mut l1 = running(&gate, pod, 1, &b); // ticks 1, 2
        let mut l2 = gate.runner(pod, 1);
        let mut l2_wait = tick(&mut l2, &b).expect("the pod runs one guest at a time"); // 3
        let mut l1_wait = tick(&mut l1, &b).expect("l1 hands on to l2"); // 4
        assert!(ready(&mut l2_wait));
        let mut l2_wait = tick(&mut l2, &b).expect("l2 hands back to l1"); // 5
        assert!(ready(&mut l1_wait));
        let mut l1_throttled = tick(&mut l1, &b).expect("the quota is spent"); // 6
        assert_eq!(gate.running(), 0, "the throttled guest gave its slot back");
        assert!(
            !ready(&mut l2_wait),
            "a free slot, but the pod is throttled"
        );
        gate.reap();
        assert!(!ready(&mut l2_wait), "still inside the period");
        // At the end of the period the epoch thread's reap hands l2 its slot.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            gate.reap();
            if ready(&mut l2_wait) {
                break;
            }
            assert!(Instant::now() < deadline, "l2 never got its slot back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !ready(&mut l1_throttled),
            "l1 queues behind l2 (one runner)"
        );
    }

    #[tokio::test]
    async fn a_throttled_guest_gives_up_its_slot_and_queues_after_its_period() {
        let gate = CpuGate::new(1);
        // 10m: the quota (1 ms per period) is spent by the first tick.
        let limited = PodBudget::new(None, Some(10));
        let unlimited = PodBudget::new(None, None);
        let mut t = gate.runner(gate.pod_id(), 1);
        let mut t_wait = tick(&mut t, &limited).expect("throttled at once");
        assert_eq!(gate.running(), 0, "a throttled guest holds no slot");
        let mut other = running(&gate, gate.pod_id(), 8, &unlimited);
        // The period ends: t queues behind `other` and gets the slot when other hands on.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gate.waiting() == 0 {
            assert!(!ready(&mut t_wait));
            assert!(tokio::time::Instant::now() < deadline, "t never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _other_wait = tick(&mut other, &unlimited).expect("hands on");
        tokio::time::timeout(Duration::from_secs(5), t_wait)
            .await
            .expect("t gets the slot");
    }
}
