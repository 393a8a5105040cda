//! Linearizability checker (Jepsen/Knossos-style) for histories of operations on independent
//! keys, each key a compare-and-set register.
//!
//! Model, per key: the register holds `Option<String>` (`None` = key absent, the initial
//! state). [`Op::Read`] observes the value, [`Op::Write`] is an unconditional put,
//! [`Op::Cas`] takes effect iff the current value equals `expected` (a PUT carrying the
//! resourceVersion that was read), [`Op::Create`] takes effect iff the key is absent.
//!
//! A history is a set of operations, each with an invocation time and a completion time.
//! It is linearizable if there is a total order of its operations that respects real time
//! (if `a` completed before `b` was invoked, `a` comes first) and in which every operation's
//! result is the one the register would give. An operation whose outcome is unknown
//! ([`Outcome::Unknown`]: timeout, connection dropped after sending) may be left out of that
//! order, or be placed anywhere after its invocation: its completion time is infinity.
//! Times are compared strictly: an op completing at `t` and one invoked at `t` count as
//! concurrent.
//!
//! Use in a test: collect events behind a `Mutex<History>`, calling [`History::invoke`]
//! right before sending a request and [`History::complete`] right after its response
//! arrives (the history uses its own logical clock, so the order of those calls is the
//! real-time order). An op never completed counts as unknown. Then `check(&history)`.
//!
//! Algorithm: Wing & Gong's search with Lowe's improvements, as in Porcupine. Keys are
//! checked separately (linearizability is compositional). Per key, a depth-first search
//! linearizes, one at a time, an op that no other pending op precedes in real time (the
//! completed ops' call and return events are kept in one time-ordered, doubly linked list:
//! the candidates are the calls before the first return), and backtracks when none fits.
//! Every configuration reached — (set of linearized ops as a bitset, register value) — is
//! memoised and never explored again. On top of that (none of these loses a solution; the
//! comments in the code say why):
//! - an observation (read, rejected CAS or create) that fits the current value is
//!   linearized at once, with no alternative tried;
//! - the other candidates are tried in order of completion;
//! - an op is not linearized where it would overwrite, for good, a value that a pending op
//!   still has to observe (this is what makes failing histories fast to decide);
//! - unknown-outcome ops are tried after the completed candidates; of several with the
//!   same effect only the earliest pending one; and a configuration is pruned when one with
//!   the same completed ops and value but a subset of its unknown-outcome ops was reached;
//! - values that no read or CAS compares against behave alike and are merged.
//!
//! A budget on explored configurations turns a search that would run too long into
//! [`Violation::Undecided`]. On generated histories of 2,000 ops with 8 clients a check
//! explores a few thousand configurations (a few ms), whether it passes or fails; the
//! search only gets hard with on the order of a hundred concurrent clients on one key.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// Default budget of [`check`]: configurations explored per key before giving up.
/// (A configuration costs about 100 bytes of memory and, depending on the concurrency,
/// 0.5 to 5 µs.)
pub const DEFAULT_MAX_STATES: u64 = 1_000_000;

/// Index of an operation in its [`History`] (shown as `#n` in messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub usize);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Observe the value; completes with [`Outcome::Read`].
    Read,
    /// Unconditional put; completes with [`Outcome::Ok`].
    Write(String),
    /// Put iff the current value equals `expected` (`None`: iff absent); completes with
    /// [`Outcome::Ok`] or [`Outcome::Rejected`].
    Cas {
        expected: Option<String>,
        new: String,
    },
    /// Put iff absent; completes with [`Outcome::Ok`] or [`Outcome::Rejected`].
    Create(String),
}

impl Op {
    pub fn write(value: &str) -> Op {
        Op::Write(value.to_string())
    }

    pub fn cas(expected: Option<&str>, new: &str) -> Op {
        Op::Cas {
            expected: expected.map(str::to_string),
            new: new.to_string(),
        }
    }

    pub fn create(value: &str) -> Op {
        Op::Create(value.to_string())
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A read returned this value (`None`: the key was absent).
    Read(Option<String>),
    /// A write, CAS or create took effect.
    Ok,
    /// A CAS or create was refused because its precondition did not hold (HTTP 409: the
    /// resourceVersion did not match / the object already exists). This is an observation
    /// and is checked like a read.
    Rejected,
    /// Unknown (timeout, connection lost after sending): the op may have taken effect at
    /// any time after its invocation, even after the client gave up, or never.
    Unknown,
    /// The op certainly did not take effect and observed nothing (e.g. the connection was
    /// refused before the request was sent). It is ignored.
    NotApplied,
}

impl Outcome {
    pub fn read(value: Option<&str>) -> Outcome {
        Outcome::Read(value.map(str::to_string))
    }
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Who issued it; only used in messages.
    pub client: usize,
    pub key: String,
    pub op: Op,
    pub invoked: u64,
    /// When the response arrived; `None` while pending. Ignored for [`Outcome::Unknown`]
    /// (whose completion time is infinity), required otherwise.
    pub completed: Option<u64>,
    /// [`Outcome::Unknown`] while pending.
    pub outcome: Outcome,
}

/// A history of operations on any number of keys.
#[derive(Clone, Debug, Default)]
pub struct History {
    events: Vec<Event>,
    clock: u64,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// Records the invocation of `op` by `client` on `key`, at the next tick of the
    /// history's logical clock. Call it before sending the request.
    pub fn invoke(&mut self, client: usize, key: &str, op: Op) -> OpId {
        self.clock += 1;
        self.events.push(Event {
            client,
            key: key.to_string(),
            op,
            invoked: self.clock,
            completed: None,
            outcome: Outcome::Unknown,
        });
        OpId(self.events.len() - 1)
    }

    /// Records the outcome of an invoked op at the next tick of the logical clock. Call it
    /// after the response arrived (or the client gave up: [`Outcome::Unknown`]).
    ///
    /// Panics if the op was already completed or the outcome does not fit the op.
    pub fn complete(&mut self, id: OpId, outcome: Outcome) {
        self.clock += 1;
        let clock = self.clock;
        let e = &mut self.events[id.0];
        assert!(
            e.completed.is_none() && e.outcome == Outcome::Unknown,
            "lincheck: {id} completed twice: {}",
            describe(id, e)
        );
        if let Err(msg) = validate(&e.op, &outcome) {
            panic!("lincheck: {id}: {msg}");
        }
        e.completed = Some(clock);
        e.outcome = outcome;
    }

    /// Appends a complete event with explicit times (for hand-written histories; the
    /// logical clock of [`History::invoke`] moves past its times).
    ///
    /// Panics if the event is malformed.
    pub fn push(&mut self, event: Event) -> OpId {
        let id = OpId(self.events.len());
        if let Err(msg) = validate(&event.op, &event.outcome) {
            panic!("lincheck: {id}: {msg}");
        }
        if event.outcome != Outcome::Unknown {
            match event.completed {
                None => panic!("lincheck: {id}: a known outcome needs a completion time"),
                Some(t) if t < event.invoked => {
                    panic!("lincheck: {id}: completed at {t}, before its invocation")
                }
                Some(_) => {}
            }
        }
        self.clock = self
            .clock
            .max(event.invoked)
            .max(event.completed.unwrap_or(0));
        self.events.push(event);
        id
    }

    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

fn validate(op: &Op, outcome: &Outcome) -> Result<(), String> {
    let fits = match outcome {
        Outcome::Unknown | Outcome::NotApplied => true,
        Outcome::Read(_) => matches!(op, Op::Read),
        Outcome::Ok => !matches!(op, Op::Read),
        Outcome::Rejected => matches!(op, Op::Cas { .. } | Op::Create(_)),
    };
    if fits {
        Ok(())
    } else {
        Err(format!("outcome {outcome:?} does not fit op {op:?}"))
    }
}

/// What a successful check looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub keys: usize,
    /// Ops with a known outcome (all of them are linearized).
    pub completed: usize,
    /// Ops with an unknown outcome, other than reads.
    pub unknown: usize,
    /// Reads with an unknown outcome and [`Outcome::NotApplied`] ops: they constrain nothing.
    pub ignored: usize,
    /// Configurations explored by the search, all keys together.
    pub explored: u64,
}

/// Why a history failed the check. `Display` (and `Debug`, so that `unwrap` prints it
/// readably) gives an explanation for a human.
#[derive(Clone, PartialEq, Eq)]
pub enum Violation {
    /// The ops of `key` have no linearization. `ops` are the ops that could come next at
    /// the end of the longest linearizable prefix found, none of which fits there.
    NotLinearizable {
        key: String,
        ops: Vec<OpId>,
        explanation: String,
    },
    /// The search for `key` hit its budget without deciding.
    Undecided {
        key: String,
        explored: u64,
        explanation: String,
    },
}

impl Violation {
    pub fn key(&self) -> &str {
        match self {
            Violation::NotLinearizable { key, .. } | Violation::Undecided { key, .. } => key,
        }
    }

    pub fn is_undecided(&self) -> bool {
        matches!(self, Violation::Undecided { .. })
    }

    /// The ops the explanation is about (empty when undecided).
    pub fn ops(&self) -> &[OpId] {
        match self {
            Violation::NotLinearizable { ops, .. } => ops,
            Violation::Undecided { .. } => &[],
        }
    }

    pub fn explanation(&self) -> &str {
        match self {
            Violation::NotLinearizable { explanation, .. }
            | Violation::Undecided { explanation, .. } => explanation,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.explanation())
    }
}

impl fmt::Debug for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.explanation())
    }
}

impl std::error::Error for Violation {}

/// Checks the history with the default budget ([`DEFAULT_MAX_STATES`] per key).
pub fn check(history: &History) -> Result<Summary, Violation> {
    check_with_budget(history, DEFAULT_MAX_STATES)
}

/// Checks every key of the history; the search for one key gives up after exploring
/// `max_states_per_key` configurations. A key that is not linearizable is reported in
/// preference to one that is undecided.
pub fn check_with_budget(history: &History, max_states_per_key: u64) -> Result<Summary, Violation> {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in history.events.iter().enumerate() {
        by_key.entry(e.key.as_str()).or_default().push(i);
    }
    let mut summary = Summary::default();
    let mut undecided = None;
    for (key, idxs) in by_key {
        summary.keys += 1;
        match check_key(history, key, &idxs, max_states_per_key, &mut summary) {
            Ok(()) => {}
            Err(v @ Violation::NotLinearizable { .. }) => return Err(v),
            Err(v) => {
                undecided.get_or_insert(v);
            }
        }
    }
    match undecided {
        Some(v) => Err(v),
        None => Ok(summary),
    }
}

/// Register value in the search: `ABSENT`, `UNOBSERVED` (any value that no read or CAS
/// compares against: they all behave the same), or an observed value.
const ABSENT: u32 = 0;
const UNOBSERVED: u32 = 1;

/// An op's effect on the (abstracted) register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    Read(u32),
    Write(u32),
    /// A CAS that took effect, or an unknown-outcome one (it is only ever linearized where
    /// it would take effect; where it would not, it is a no-op and may as well be left out).
    Cas {
        expected: u32,
        new: u32,
    },
    CasRejected {
        expected: u32,
    },
    /// Like `Cas`, for creates.
    Create(u32),
    CreateRejected,
}

impl Step {
    /// The value the register must hold for the op to happen, for ops with a known
    /// outcome that change the value (observations fit other values too) or read it.
    fn needs(self) -> Option<u32> {
        match self {
            Step::Read(v) => Some(v),
            Step::Cas { expected, .. } => Some(expected),
            Step::Create(_) => Some(ABSENT),
            Step::Write(_) | Step::CasRejected { .. } | Step::CreateRejected => None,
        }
    }

    /// The value the op puts, if it puts one.
    fn writes(self) -> Option<u32> {
        match self {
            Step::Write(v) | Step::Cas { new: v, .. } | Step::Create(v) => Some(v),
            Step::Read(_) | Step::CasRejected { .. } | Step::CreateRejected => None,
        }
    }

    fn is_observation(self) -> bool {
        matches!(
            self,
            Step::Read(_) | Step::CasRejected { .. } | Step::CreateRejected
        )
    }

    /// The register value after the op, or `None` if the op cannot happen at `cur`.
    fn apply(self, cur: u32) -> Option<u32> {
        match self {
            Step::Read(v) => (cur == v).then_some(cur),
            Step::Write(v) => Some(v),
            Step::Cas { expected, new } => (cur == expected).then_some(new),
            Step::CasRejected { expected } => (cur != expected).then_some(cur),
            Step::Create(v) => (cur == ABSENT).then_some(v),
            Step::CreateRejected => (cur != ABSENT).then_some(cur),
        }
    }
}

struct KeyOp {
    id: OpId,
    inv: u64,
    /// `u64::MAX` for unknown outcomes (never used for them).
    ret: u64,
    step: Step,
}

/// The value an op puts if it takes effect, if it may have taken effect.
fn written_value(e: &Event) -> Option<&str> {
    match (&e.op, &e.outcome) {
        (_, Outcome::Rejected | Outcome::NotApplied | Outcome::Read(_)) => None,
        (Op::Write(v), _) | (Op::Create(v), _) | (Op::Cas { new: v, .. }, _) => Some(v),
        (Op::Read, _) => None,
    }
}

fn check_key(
    history: &History,
    key: &str,
    idxs: &[usize],
    budget: u64,
    summary: &mut Summary,
) -> Result<(), Violation> {
    let events = &history.events;
    let mut known_idx = Vec::new();
    let mut unknown_idx = Vec::new();
    for &i in idxs {
        match (&events[i].op, &events[i].outcome) {
            (_, Outcome::NotApplied) | (Op::Read, Outcome::Unknown) => summary.ignored += 1,
            (_, Outcome::Unknown) => unknown_idx.push(i),
            _ => known_idx.push(i),
        }
    }
    summary.completed += known_idx.len();
    summary.unknown += unknown_idx.len();

    // A value observed that nothing wrote: say so directly.
    let written: HashSet<&str> = known_idx
        .iter()
        .chain(&unknown_idx)
        .filter_map(|&i| written_value(&events[i]))
        .collect();
    for &i in &known_idx {
        let e = &events[i];
        let needed = match (&e.op, &e.outcome) {
            (Op::Read, Outcome::Read(Some(v))) => Some((v, "read")),
            (
                Op::Cas {
                    expected: Some(v), ..
                },
                Outcome::Ok,
            ) => Some((v, "succeeded expecting")),
            _ => None,
        };
        if let Some((v, what)) = needed {
            if !written.contains(v.as_str()) {
                return Err(Violation::NotLinearizable {
                    key: key.to_string(),
                    ops: vec![OpId(i)],
                    explanation: format!(
                        "key {key:?} is not linearizable:\n  {}\n{what} {v:?}, a value that no \
                         operation on this key wrote (not even one with an unknown outcome).",
                        describe(OpId(i), e)
                    ),
                });
            }
        }
    }

    // Intern the values that some op compares against; the others are all `UNOBSERVED`.
    let mut observed: HashMap<&str, u32> = HashMap::new();
    for &i in known_idx.iter().chain(&unknown_idx) {
        let v = match (&events[i].op, &events[i].outcome) {
            (Op::Read, Outcome::Read(Some(v))) => v,
            (
                Op::Cas {
                    expected: Some(v), ..
                },
                _,
            ) => v,
            _ => continue,
        };
        let next = observed.len() as u32 + 2;
        observed.entry(v.as_str()).or_insert(next);
    }
    let canon = |v: Option<&String>| match v {
        None => ABSENT,
        Some(v) => observed.get(v.as_str()).copied().unwrap_or(UNOBSERVED),
    };
    let key_op = |i: usize| {
        let e = &events[i];
        let step = match (&e.op, &e.outcome) {
            (Op::Read, Outcome::Read(v)) => Step::Read(canon(v.as_ref())),
            (Op::Write(v), _) => Step::Write(canon(Some(v))),
            (Op::Cas { expected, .. }, Outcome::Rejected) => Step::CasRejected {
                expected: canon(expected.as_ref()),
            },
            (Op::Cas { expected, new }, _) => Step::Cas {
                expected: canon(expected.as_ref()),
                new: canon(Some(new)),
            },
            (Op::Create(_), Outcome::Rejected) => Step::CreateRejected,
            (Op::Create(v), _) => Step::Create(canon(Some(v))),
            (Op::Read, _) => unreachable!("unknown reads are ignored"),
        };
        let ret = match e.outcome {
            Outcome::Unknown => u64::MAX,
            _ => e.completed.expect("validated by History::push"),
        };
        KeyOp {
            id: OpId(i),
            inv: e.invoked,
            ret,
            step,
        }
    };
    let mut known: Vec<KeyOp> = known_idx.iter().map(|&i| key_op(i)).collect();
    let mut unknown: Vec<KeyOp> = unknown_idx.iter().map(|&i| key_op(i)).collect();
    known.sort_by_key(|o| (o.inv, o.id));
    unknown.sort_by_key(|o| (o.inv, o.id));

    let mut search = Search::new(&known, &unknown, observed.len() + 2, budget);
    let verdict = search.run();
    summary.explored += search.explored;
    if verdict == Verdict::Linearizable {
        return Ok(());
    }
    let undecided = verdict == Verdict::Undecided;
    let (ops, detail) = explain(history, &known, &unknown, &search.best_path, !undecided);
    let counts = format!(
        "{} completed and {} unknown-outcome ops",
        known.len(),
        unknown.len()
    );
    Err(if undecided {
        Violation::Undecided {
            key: key.to_string(),
            explored: search.explored,
            explanation: format!(
                "key {key:?}: undecided: gave up after exploring {} configurations \
                 (the budget) of its {counts}; try a larger budget, or fewer concurrent \
                 clients per key.\n{detail}",
                search.explored
            ),
        }
    } else {
        Violation::NotLinearizable {
            key: key.to_string(),
            ops,
            explanation: format!(
                "key {key:?} is not linearizable: no order of its {counts} respects both \
                 real time and the register's semantics.\n{detail}"
            ),
        }
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ref {
    Known(usize),
    Unknown(usize),
}

/// An op linearized on the current path, with what undoing it needs.
struct Frame {
    op: Ref,
    prev_value: u32,
}

/// The choices at one configuration of the current path: the candidates with a known
/// outcome (`cands[start..end]`, next `pos`), then the pending unknown-outcome ops
/// invoked no later than `bound`, walking their list from node `unode`.
struct Level {
    start: u32,
    end: u32,
    pos: u32,
    bound: u64,
    /// `None`: no unknown-outcome op is tried here (see `Search::open_level`).
    unode: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    NotLinearizable,
    Undecided,
}

fn unlink(prev: &mut [u32], next: &mut [u32], x: usize) {
    let (p, n) = (prev[x] as usize, next[x] as usize);
    next[p] = n as u32;
    prev[n] = p as u32;
}

/// Undoes `unlink(x)`; undos must come in the reverse order of the unlinks.
fn relink(prev: &mut [u32], next: &mut [u32], x: usize) {
    let (p, n) = (prev[x] as usize, next[x] as usize);
    next[p] = x as u32;
    prev[n] = x as u32;
}

fn is_subset(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x & !y == 0)
}

struct Search<'a> {
    known: &'a [KeyOp],
    unknown: &'a [KeyOp],
    budget: u64,
    // Call and return events of the pending completed ops, by time (calls first at equal
    // times), as a doubly linked list with sentinels at 0 and at the end: the candidates
    // are the calls before the first return.
    ent_op: Vec<u32>,
    ent_is_ret: Vec<bool>,
    ent_time: Vec<u64>,
    prev: Vec<u32>,
    next: Vec<u32>,
    call_ent: Vec<u32>,
    ret_ent: Vec<u32>,
    // Pending unknown-outcome ops by invocation: node `u + 1` is `unknown[u]`; sentinels
    // at 0 and at the end.
    uprev: Vec<u32>,
    unext: Vec<u32>,
    /// Unknown-outcome ops with the same `Step` are interchangeable, except that they
    /// become available at different times; so only the earliest pending one of each
    /// class is ever tried, and the linearized ones of a class are always its first ones.
    /// Class of each, rank in its class, and linearized count per class.
    class: Vec<u32>,
    rank: Vec<u32>,
    class_lin: Vec<u32>,
    value: u32,
    /// Linearized completed ops (bit per index of `known`), how many, and the first not.
    lin: Vec<u64>,
    nlin: usize,
    first_unlin: usize,
    /// Linearized unknown-outcome ops.
    ubits: Vec<u64>,
    /// Per value: pending completed ops that need the register to hold it, and pending
    /// ops (unknown-outcome ones too) that may write it. Leaving a value that some
    /// pending op needs and none can write again is a dead end.
    needed_by: Vec<u32>,
    writers: Vec<u32>,
    /// Configuration (value, completed ops linearized) -> the sets of unknown-outcome ops
    /// (each `ubits.len()` words, concatenated) it was reached with, minimal ones only.
    memo: HashMap<Box<[u64]>, Vec<u64>>,
    scratch: Vec<u64>,
    /// The current path, and the choices at each configuration on it (one more).
    stack: Vec<Frame>,
    levels: Vec<Level>,
    cands: Vec<u32>,
    explored: u64,
    /// The path that linearized the most completed ops.
    best_path: Vec<Ref>,
    best_nlin: usize,
}

impl<'a> Search<'a> {
    fn new(known: &'a [KeyOp], unknown: &'a [KeyOp], nvalues: usize, budget: u64) -> Search<'a> {
        let nk = known.len();
        let mut needed_by = vec![0; nvalues];
        let mut writers = vec![0; nvalues];
        for op in known {
            if let Some(v) = op.step.needs() {
                needed_by[v as usize] += 1;
            }
        }
        for op in known.iter().chain(unknown) {
            if let Some(v) = op.step.writes() {
                writers[v as usize] += 1;
            }
        }
        let mut order: Vec<(u64, bool, u32)> = Vec::with_capacity(2 * nk);
        for (k, op) in known.iter().enumerate() {
            order.push((op.inv, false, k as u32));
            order.push((op.ret, true, k as u32));
        }
        order.sort_unstable();
        let ne = order.len() + 2;
        let mut ent_op = vec![0; ne];
        let mut ent_is_ret = vec![false; ne];
        let mut ent_time = vec![0; ne];
        let mut call_ent = vec![0; nk];
        let mut ret_ent = vec![0; nk];
        for (i, &(t, is_ret, k)) in order.iter().enumerate() {
            let e = i + 1;
            ent_op[e] = k;
            ent_is_ret[e] = is_ret;
            ent_time[e] = t;
            if is_ret {
                ret_ent[k as usize] = e as u32;
            } else {
                call_ent[k as usize] = e as u32;
            }
        }
        let nu = unknown.len();
        let mut classes: HashMap<Step, (u32, u32)> = HashMap::new();
        let (mut class, mut rank) = (Vec::with_capacity(nu), Vec::with_capacity(nu));
        for op in unknown {
            let next = classes.len() as u32;
            let (c, members) = classes.entry(op.step).or_insert((next, 0));
            class.push(*c);
            rank.push(*members);
            *members += 1;
        }
        Search {
            known,
            unknown,
            budget,
            ent_op,
            ent_is_ret,
            ent_time,
            prev: (0..ne).map(|e| e.saturating_sub(1) as u32).collect(),
            next: (0..ne).map(|e| (e + 1).min(ne - 1) as u32).collect(),
            call_ent,
            ret_ent,
            uprev: (0..nu + 2).map(|n| n.saturating_sub(1) as u32).collect(),
            unext: (0..nu + 2).map(|n| (n + 1).min(nu + 1) as u32).collect(),
            class,
            rank,
            class_lin: vec![0; classes.len()],
            value: ABSENT,
            lin: vec![0; nk.div_ceil(64)],
            nlin: 0,
            first_unlin: 0,
            ubits: vec![0; nu.div_ceil(64)],
            needed_by,
            writers,
            memo: HashMap::new(),
            scratch: Vec::new(),
            stack: Vec::new(),
            levels: Vec::new(),
            cands: Vec::new(),
            explored: 0,
            best_path: Vec::new(),
            best_nlin: 0,
        }
    }

    fn run(&mut self) -> Verdict {
        self.open_level();
        loop {
            if self.nlin == self.known.len() {
                return Verdict::Linearizable;
            }
            if self.explored >= self.budget {
                return Verdict::Undecided;
            }
            match self.next_choice() {
                Some(r) => {
                    if self.try_push(r) {
                        self.open_level();
                    }
                }
                None => {
                    // Nothing (more) fits here: undo the op that led here.
                    let level = self.levels.pop().expect("a level per configuration");
                    self.cands.truncate(level.start as usize);
                    if self.pop().is_none() {
                        return Verdict::NotLinearizable;
                    }
                }
            }
        }
    }

    /// Records the choices at the configuration just reached.
    fn open_level(&mut self) {
        if self.nlin == self.known.len() {
            return; // done
        }
        let start = self.cands.len() as u32;
        let mut e = self.next[0] as usize;
        // Some completed op is pending, so a return comes before the tail.
        while !self.ent_is_ret[e] {
            let k = self.ent_op[e];
            let step = self.known[k as usize].step;
            if step.is_observation() && step.apply(self.value).is_some() {
                // An observation (read, rejected CAS or create) that fits now can go first:
                // it changes nothing, and no pending op has to precede it. So if the rest
                // can be linearized at all, it can be with this op next: try only that.
                self.cands.truncate(start as usize);
                self.cands.push(k);
                self.levels.push(Level {
                    start,
                    end: start + 1,
                    pos: start,
                    bound: 0,
                    unode: None,
                });
                return;
            }
            self.cands.push(k);
            e = self.next[e] as usize;
        }
        // The op due first goes first: linearizing others early is what usually goes wrong.
        let known = self.known;
        self.cands[start as usize..].sort_unstable_by_key(|&k| (known[k as usize].ret, k));
        self.levels.push(Level {
            start,
            end: self.cands.len() as u32,
            pos: start,
            bound: self.ent_time[e],
            unode: Some(self.unext[0]),
        });
    }

    /// The next op to try at the current configuration.
    fn next_choice(&mut self) -> Option<Ref> {
        let utail = (self.unext.len() - 1) as u32;
        let level = self.levels.last_mut()?;
        if level.pos < level.end {
            level.pos += 1;
            return Some(Ref::Known(self.cands[level.pos as usize - 1] as usize));
        }
        // Then the unknown-outcome ops invoked by the time the first pending completed op
        // completed.
        loop {
            let n = level.unode?;
            if n == utail || self.unknown[n as usize - 1].inv > level.bound {
                level.unode = None;
                return None;
            }
            let u = n as usize - 1;
            level.unode = Some(self.unext[n as usize]);
            // If an earlier op with the same effect is pending, that one is tried instead.
            if self.rank[u] == self.class_lin[self.class[u] as usize] {
                return Some(Ref::Unknown(u));
            }
        }
    }

    fn try_push(&mut self, r: Ref) -> bool {
        let op = match r {
            Ref::Known(k) => &self.known[k],
            Ref::Unknown(u) => &self.unknown[u],
        };
        let Some(new) = op.step.apply(self.value) else {
            return false;
        };
        self.mark(r);
        // Leaving, for good, a value that a pending op still needs is a dead end.
        let old = self.value as usize;
        let dead = new as usize != old && self.needed_by[old] > 0 && self.writers[old] == 0;
        if dead || self.seen(new) {
            self.unmark(r);
            return false;
        }
        self.stack.push(Frame {
            op: r,
            prev_value: self.value,
        });
        self.value = new;
        self.lift(r);
        self.explored += 1;
        if self.nlin > self.best_nlin {
            self.best_nlin = self.nlin;
            self.best_path = self.stack.iter().map(|f| f.op).collect();
        }
        true
    }

    fn pop(&mut self) -> Option<Frame> {
        let f = self.stack.pop()?;
        self.unlift(f.op);
        self.unmark(f.op);
        self.value = f.prev_value;
        Some(f)
    }

    fn mark(&mut self, r: Ref) {
        let step = match r {
            Ref::Known(k) => self.known[k].step,
            Ref::Unknown(u) => self.unknown[u].step,
        };
        if let (Ref::Known(_), Some(v)) = (r, step.needs()) {
            self.needed_by[v as usize] -= 1;
        }
        if let Some(v) = step.writes() {
            self.writers[v as usize] -= 1;
        }
        match r {
            Ref::Known(k) => {
                self.lin[k / 64] |= 1 << (k % 64);
                self.nlin += 1;
                while self.first_unlin < self.known.len()
                    && self.lin[self.first_unlin / 64] & (1 << (self.first_unlin % 64)) != 0
                {
                    self.first_unlin += 1;
                }
            }
            Ref::Unknown(u) => {
                self.ubits[u / 64] |= 1 << (u % 64);
                self.class_lin[self.class[u] as usize] += 1;
            }
        }
    }

    fn unmark(&mut self, r: Ref) {
        let step = match r {
            Ref::Known(k) => self.known[k].step,
            Ref::Unknown(u) => self.unknown[u].step,
        };
        if let (Ref::Known(_), Some(v)) = (r, step.needs()) {
            self.needed_by[v as usize] += 1;
        }
        if let Some(v) = step.writes() {
            self.writers[v as usize] += 1;
        }
        match r {
            Ref::Known(k) => {
                self.lin[k / 64] &= !(1 << (k % 64));
                self.nlin -= 1;
                self.first_unlin = self.first_unlin.min(k);
            }
            Ref::Unknown(u) => {
                self.ubits[u / 64] &= !(1 << (u % 64));
                self.class_lin[self.class[u] as usize] -= 1;
            }
        }
    }

    fn lift(&mut self, r: Ref) {
        match r {
            Ref::Known(k) => {
                unlink(&mut self.prev, &mut self.next, self.call_ent[k] as usize);
                unlink(&mut self.prev, &mut self.next, self.ret_ent[k] as usize);
            }
            Ref::Unknown(u) => unlink(&mut self.uprev, &mut self.unext, u + 1),
        }
    }

    fn unlift(&mut self, r: Ref) {
        match r {
            Ref::Known(k) => {
                relink(&mut self.prev, &mut self.next, self.ret_ent[k] as usize);
                relink(&mut self.prev, &mut self.next, self.call_ent[k] as usize);
            }
            Ref::Unknown(u) => relink(&mut self.uprev, &mut self.unext, u + 1),
        }
    }

    /// Whether the configuration (current marks, `value`) is covered by one already
    /// reached; records it if not. Reached and not successful means failed (or, for an
    /// ancestor on the path, being explored). A configuration with the same completed ops
    /// linearized and the same value but only a subset of the unknown-outcome ops covers
    /// this one: the extra unknown-outcome ops need not be linearized, and pending they
    /// constrain nothing (they never complete), so whatever completes this one completes
    /// that one too.
    fn seen(&mut self, value: u32) -> bool {
        // Exact key: every completed op before `first_unlin` is linearized, so the words
        // from the one holding it up to the last non-zero one determine the set.
        let from = self.first_unlin / 64;
        let mut to = self.lin.len();
        while to > from && self.lin[to - 1] == 0 {
            to -= 1;
        }
        self.scratch.clear();
        self.scratch.push((u64::from(value) << 32) | from as u64);
        self.scratch.extend_from_slice(&self.lin[from..to]);
        let w = self.ubits.len();
        match self.memo.get_mut(self.scratch.as_slice()) {
            None => {
                self.memo
                    .insert(self.scratch.as_slice().into(), self.ubits.clone());
                false
            }
            Some(_) if w == 0 => true,
            Some(sets) => {
                if sets.chunks_exact(w).any(|s| is_subset(s, &self.ubits)) {
                    return true;
                }
                let mut kept = Vec::with_capacity(sets.len() + w);
                for s in sets.chunks_exact(w) {
                    if !is_subset(&self.ubits, s) {
                        kept.extend_from_slice(s);
                    }
                }
                kept.extend_from_slice(&self.ubits);
                *sets = kept;
                false
            }
        }
    }
}

fn show(v: Option<&str>) -> String {
    match v {
        None => "absent".to_string(),
        Some(v) => format!("{v:?}"),
    }
}

/// One line describing an op, e.g. `#7 client 2 [160, 170] read => "a"`.
fn describe(id: OpId, e: &Event) -> String {
    let ret = match (&e.outcome, e.completed) {
        (Outcome::Unknown, _) | (_, None) => "?".to_string(),
        (_, Some(t)) => t.to_string(),
    };
    let op = match &e.op {
        Op::Read => "read".to_string(),
        Op::Write(v) => format!("write {v:?}"),
        Op::Cas { expected, new } => format!("cas {} -> {new:?}", show(expected.as_deref())),
        Op::Create(v) => format!("create {v:?}"),
    };
    let outcome = match &e.outcome {
        Outcome::Read(v) => show(v.as_deref()),
        Outcome::Ok => "ok".to_string(),
        Outcome::Rejected => "rejected".to_string(),
        Outcome::Unknown => "unknown outcome".to_string(),
        Outcome::NotApplied => "not applied".to_string(),
    };
    format!(
        "{id} client {} [{}, {ret}] {op} => {outcome}",
        e.client, e.invoked
    )
}

/// The real register value after `e` at `cur`, following the search's semantics.
fn apply_real<'e>(e: &'e Event, cur: Option<&'e str>) -> Option<&'e str> {
    match (&e.op, &e.outcome) {
        (Op::Read, _) | (_, Outcome::Rejected) => cur,
        (Op::Write(v), _) => Some(v),
        (Op::Cas { new, .. }, Outcome::Ok) => Some(new),
        (Op::Cas { expected, new }, _) => {
            if cur == expected.as_deref() {
                Some(new)
            } else {
                cur
            }
        }
        (Op::Create(v), _) => Some(cur.unwrap_or(v)),
    }
}

/// The value the register must hold for the completed op `e` to happen, if it needs one.
fn needs_real(e: &Event) -> Option<Option<&str>> {
    match (&e.op, &e.outcome) {
        (Op::Read, Outcome::Read(v)) => Some(v.as_deref()),
        (Op::Cas { expected, .. }, Outcome::Ok) => Some(expected.as_deref()),
        (Op::Create(_), Outcome::Ok) => Some(None),
        _ => None,
    }
}

/// Why `e` cannot be linearized when the register holds `cur`, if it cannot.
fn why_not(e: &Event, cur: Option<&str>) -> Option<String> {
    let held = show(cur);
    match (&e.op, &e.outcome) {
        (Op::Read, Outcome::Read(v)) if v.as_deref() != cur => Some(format!(
            "it returned {}, but the register held {held}",
            show(v.as_deref())
        )),
        (Op::Cas { expected, .. }, Outcome::Ok) if expected.as_deref() != cur => Some(format!(
            "it succeeded, so the register held {}, but it held {held}",
            show(expected.as_deref())
        )),
        (Op::Cas { expected, .. }, Outcome::Rejected) if expected.as_deref() == cur => Some(
            format!("it was rejected, but the register held the expected value {held}"),
        ),
        (Op::Create(_), Outcome::Ok) if cur.is_some() => Some(format!(
            "it succeeded, so the key was absent, but it held {held}"
        )),
        (Op::Create(_), Outcome::Rejected) if cur.is_none() => {
            Some("it was rejected, but the key was absent".to_string())
        }
        _ => None,
    }
}

/// Shows the longest linearizable prefix found and, if `stuck` (the search is over), why
/// none of the ops that could come next there fits: returns those ops (and the ones they
/// would starve) and a human-readable account.
fn explain(
    history: &History,
    known: &[KeyOp],
    unknown: &[KeyOp],
    best: &[Ref],
    stuck: bool,
) -> (Vec<OpId>, String) {
    const SHOWN: usize = 10;
    let events = &history.events;
    let id_of = |r: &Ref| match *r {
        Ref::Known(k) => known[k].id,
        Ref::Unknown(u) => unknown[u].id,
    };
    let mut out = String::new();
    let mut cur: Option<&str> = None;
    for r in best {
        let id = id_of(r);
        cur = apply_real(&events[id.0], cur);
    }
    let mut in_path = vec![false; known.len()];
    let mut unknown_in_path = vec![false; unknown.len()];
    for r in best {
        match *r {
            Ref::Known(k) => in_path[k] = true,
            Ref::Unknown(u) => unknown_in_path[u] = true,
        }
    }
    let n_known = in_path.iter().filter(|&&b| b).count();
    if best.is_empty() {
        out.push_str("Not even a first op can be linearized (the key starts absent).\n");
    } else {
        out.push_str(&format!(
            "The longest linearizable prefix found orders {n_known} of the {} completed ops",
            known.len()
        ));
        match best.len() - n_known {
            0 => out.push_str(". "),
            1 => out.push_str(" and 1 unknown-outcome op (as applied). "),
            n => out.push_str(&format!(" and {n} unknown-outcome ops (as applied). ")),
        }
        if best.len() > SHOWN {
            out.push_str(&format!(
                "Its last {SHOWN} ops ({} before them):\n",
                best.len() - SHOWN
            ));
        } else {
            out.push_str("In that order:\n");
        }
        for r in &best[best.len().saturating_sub(SHOWN)..] {
            let id = id_of(r);
            out.push_str(&format!("  {}\n", describe(id, &events[id.0])));
        }
        out.push_str(&format!("after which the register holds {}.\n", show(cur)));
    }
    if !stuck {
        return (Vec::new(), out);
    }
    // The candidates to come next: pending completed ops invoked no later than the
    // earliest completion among them.
    let pending: Vec<usize> = (0..known.len()).filter(|&k| !in_path[k]).collect();
    let Some(&blocker) = pending
        .iter()
        .min_by_key(|&&k| (known[k].ret, known[k].inv))
    else {
        return (Vec::new(), out);
    };
    let bound = known[blocker].ret;
    let candidates: Vec<usize> = pending
        .into_iter()
        .filter(|&k| known[k].inv <= bound)
        .collect();
    out.push_str("None of the ops that could come next fits:\n");
    let mut involved: Vec<OpId> = candidates.iter().map(|&k| known[k].id).collect();
    for &k in &candidates {
        let id = known[k].id;
        let e = &events[id.0];
        let reason = why_not(e, cur)
            .or_else(|| {
                // It fits, but it would overwrite a value that a pending op still needs
                // and that no pending op can write again.
                if apply_real(e, cur) == cur {
                    return None;
                }
                let needers: Vec<OpId> = (0..known.len())
                    .filter(|&j| j != k && !in_path[j])
                    .map(|j| known[j].id)
                    .filter(|n| needs_real(&events[n.0]) == Some(cur))
                    .collect();
                let rewritable = cur.is_some()
                    && (0..known.len())
                        .filter(|&j| j != k && !in_path[j])
                        .map(|j| known[j].id)
                        .chain(
                            (0..unknown.len())
                                .filter(|&u| !unknown_in_path[u])
                                .map(|u| unknown[u].id),
                        )
                        .any(|w| written_value(&events[w.0]) == cur);
                if needers.is_empty() || rewritable {
                    return None;
                }
                let (who, verb) = match needers.len() {
                    1 => ("this op", "needs"),
                    _ => ("these ops", "need"),
                };
                let mut reason = format!(
                    "it fits here, but it would overwrite {} for good (no pending op can \
                     write it again), while {who} still {verb} the register to hold it:",
                    show(cur)
                );
                for n in needers.iter().take(3) {
                    reason.push_str(&format!("\n      {}", describe(*n, &events[n.0])));
                }
                if needers.len() > 3 {
                    reason.push_str(&format!("\n      and {} more", needers.len() - 3));
                }
                for n in needers {
                    if !involved.contains(&n) {
                        involved.push(n);
                    }
                }
                Some(reason)
            })
            .unwrap_or_else(|| {
                "it fits here, but every continuation after it was tried and failed".to_string()
            });
        out.push_str(&format!("  {}: {reason}", describe(id, e)));
        if let Some(needed @ Some(v)) = needs_real(e) {
            if needed != cur {
                let writer = known
                    .iter()
                    .chain(unknown)
                    .find(|o| written_value(&events[o.id.0]) == needed);
                if let Some(w) = writer {
                    out.push_str(&format!(
                        "\n      ({v:?} was written by {})",
                        describe(w.id, &events[w.id.0])
                    ));
                }
            }
        }
        out.push('\n');
    }
    let blocker_id = known[blocker].id;
    out.push_str(&format!(
        "({blocker_id} completed at {bound}, so the ops invoked after that cannot come before it."
    ));
    let n_unknown = (0..unknown.len())
        .filter(|&u| !unknown_in_path[u] && unknown[u].inv <= bound)
        .count();
    match n_unknown {
        0 => {}
        1 => out.push_str(
            " Applying the pending unknown-outcome op invoked by then does not help either.",
        ),
        n => out.push_str(&format!(
            " Applying any of the {n} pending unknown-outcome ops invoked by then does not \
             help either."
        )),
    }
    out.push_str(")\n");
    (involved, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "k";

    /// Appends a completed op on key `K`.
    fn op(h: &mut History, client: usize, op: Op, inv: u64, ret: u64, outcome: Outcome) -> OpId {
        h.push(Event {
            client,
            key: K.to_string(),
            op,
            invoked: inv,
            completed: Some(ret),
            outcome,
        })
    }

    /// Appends an op on key `K` whose outcome is unknown (the client gave up at `gave_up`).
    fn unknown(h: &mut History, client: usize, op: Op, inv: u64, gave_up: u64) -> OpId {
        h.push(Event {
            client,
            key: K.to_string(),
            op,
            invoked: inv,
            completed: Some(gave_up),
            outcome: Outcome::Unknown,
        })
    }

    fn ok(v: Option<&str>) -> Outcome {
        Outcome::read(v)
    }

    fn not_linearizable(h: &History) -> Violation {
        match check(h) {
            Ok(s) => panic!("expected a violation, the check passed: {s:?}"),
            Err(v) if v.is_undecided() => panic!("expected a violation, got: {v}"),
            Err(v) => v,
        }
    }

    #[test]
    fn sequential_valid_history_passes() {
        let mut h = History::new();
        op(&mut h, 0, Op::Read, 0, 1, ok(None));
        op(&mut h, 0, Op::create("a"), 2, 3, Outcome::Ok);
        op(&mut h, 1, Op::create("x"), 4, 5, Outcome::Rejected);
        op(&mut h, 1, Op::Read, 6, 7, ok(Some("a")));
        op(&mut h, 0, Op::cas(Some("a"), "b"), 8, 9, Outcome::Ok);
        op(
            &mut h,
            1,
            Op::cas(Some("a"), "c"),
            10,
            11,
            Outcome::Rejected,
        );
        op(&mut h, 0, Op::write("d"), 12, 13, Outcome::Ok);
        op(&mut h, 1, Op::Read, 14, 15, ok(Some("d")));
        op(&mut h, 1, Op::cas(None, "e"), 16, 17, Outcome::Rejected);
        let s = check(&h).unwrap();
        assert_eq!(s.keys, 1);
        assert_eq!(s.completed, 9);
    }

    #[test]
    fn concurrent_ops_with_a_valid_order_pass() {
        let mut h = History::new();
        // Two concurrent writes; reads after both see the one ordered last, consistently.
        op(&mut h, 0, Op::write("a"), 0, 10, Outcome::Ok);
        op(&mut h, 1, Op::write("b"), 5, 15, Outcome::Ok);
        // Concurrent with "b": may see "a" ...
        op(&mut h, 2, Op::Read, 11, 14, ok(Some("a")));
        op(&mut h, 2, Op::Read, 16, 18, ok(Some("b")));
        // Concurrent CASes from "b": one wins; a read concurrent with the winner sees the
        // old value; the loser must come after the winner.
        op(
            &mut h,
            0,
            Op::cas(Some("b"), "c"),
            20,
            30,
            Outcome::Rejected,
        );
        op(&mut h, 1, Op::cas(Some("b"), "d"), 21, 29, Outcome::Ok);
        op(&mut h, 2, Op::Read, 22, 24, ok(Some("b")));
        op(&mut h, 2, Op::Read, 25, 40, ok(Some("d")));
        check(&h).unwrap();

        // The same shape through the logical-clock API: w and r overlap.
        let mut h = History::new();
        let w = h.invoke(0, K, Op::write("a"));
        let r = h.invoke(1, K, Op::Read);
        h.complete(r, ok(None));
        h.complete(w, Outcome::Ok);
        let r = h.invoke(1, K, Op::Read);
        h.complete(r, ok(Some("a")));
        check(&h).unwrap();
    }

    #[test]
    fn lost_write_fails() {
        let mut h = History::new();
        op(&mut h, 0, Op::write("a"), 0, 1, Outcome::Ok);
        op(&mut h, 0, Op::write("b"), 2, 3, Outcome::Ok);
        let r = op(&mut h, 0, Op::Read, 4, 5, ok(Some("a")));
        let v = not_linearizable(&h);
        assert_eq!(v.key(), K);
        // The search stops at "a": writing "b" would lose the value the read needs.
        assert_eq!(v.ops(), &[OpId(1), r]);
        let msg = v.to_string();
        assert!(msg.contains("would overwrite \"a\" for good"), "{msg}");
        assert!(msg.contains("#2 client 0 [4, 5] read => \"a\""), "{msg}");
    }

    #[test]
    fn stale_read_fails() {
        let mut h = History::new();
        op(&mut h, 0, Op::create("a"), 0, 1, Outcome::Ok);
        op(&mut h, 0, Op::cas(Some("a"), "b"), 10, 20, Outcome::Ok);
        // Another client's read, concurrent with the CAS, may still see "a" ...
        op(&mut h, 1, Op::Read, 15, 18, ok(Some("a")));
        check(&h).unwrap();
        // ... but not one invoked after the CAS completed.
        let stale = op(&mut h, 2, Op::Read, 21, 22, ok(Some("a")));
        let v = not_linearizable(&h);
        assert!(v.ops().contains(&stale), "{v}");
    }

    #[test]
    fn cas_applied_twice_fails() {
        let mut h = History::new();
        op(&mut h, 0, Op::write("a"), 0, 1, Outcome::Ok);
        let c1 = op(&mut h, 1, Op::cas(Some("a"), "b"), 2, 10, Outcome::Ok);
        let c2 = op(&mut h, 2, Op::cas(Some("a"), "c"), 3, 9, Outcome::Ok);
        // Either one would overwrite "a", which the other needs.
        let v = not_linearizable(&h);
        assert_eq!(v.ops(), &[c1, c2], "{v}");
        assert!(v.to_string().contains("overwrite \"a\" for good"), "{v}");
    }

    #[test]
    fn unknown_write_may_take_effect_later_or_never() {
        // Later: the client gave up at 3, the write landed after a read at [4, 5].
        let mut h = History::new();
        op(&mut h, 0, Op::write("a"), 0, 1, Outcome::Ok);
        unknown(&mut h, 1, Op::write("b"), 2, 3);
        op(&mut h, 0, Op::Read, 4, 5, ok(Some("a")));
        op(&mut h, 0, Op::Read, 100, 101, ok(Some("b")));
        op(&mut h, 0, Op::cas(Some("b"), "c"), 102, 103, Outcome::Ok);
        check(&h).unwrap();

        // Never.
        let mut h = History::new();
        op(&mut h, 0, Op::write("a"), 0, 1, Outcome::Ok);
        unknown(&mut h, 1, Op::write("b"), 2, 3);
        unknown(&mut h, 1, Op::cas(Some("a"), "c"), 4, 5);
        unknown(&mut h, 1, Op::create("d"), 6, 7);
        op(&mut h, 0, Op::Read, 100, 101, ok(Some("a")));
        op(&mut h, 0, Op::cas(Some("a"), "e"), 102, 103, Outcome::Ok);
        check(&h).unwrap();

        // A pending op (never completed) is unknown too.
        let mut h = History::new();
        h.invoke(1, K, Op::write("b"));
        let r = h.invoke(0, K, Op::Read);
        h.complete(r, ok(Some("b")));
        let r = h.invoke(0, K, Op::Read);
        h.complete(r, ok(Some("b")));
        let s = check(&h).unwrap();
        assert_eq!((s.completed, s.unknown), (2, 1));
    }

    #[test]
    fn unknown_write_cannot_take_effect_before_its_invocation() {
        let mut h = History::new();
        let r = op(&mut h, 0, Op::Read, 0, 5, ok(Some("b")));
        unknown(&mut h, 1, Op::write("b"), 6, 7);
        let v = not_linearizable(&h);
        assert_eq!(v.ops(), &[r]);

        // Nor can it take effect twice: once overwritten, its value is gone.
        let mut h = History::new();
        unknown(&mut h, 1, Op::write("b"), 0, 1);
        op(&mut h, 0, Op::Read, 2, 3, ok(Some("b")));
        op(&mut h, 0, Op::write("c"), 4, 5, Outcome::Ok);
        let r = op(&mut h, 0, Op::Read, 6, 7, ok(Some("b")));
        assert_eq!(not_linearizable(&h).ops(), &[OpId(2), r]);
    }

    #[test]
    fn read_of_a_value_never_written_fails() {
        let mut h = History::new();
        op(&mut h, 0, Op::write("a"), 0, 1, Outcome::Ok);
        let r = op(&mut h, 1, Op::Read, 0, 1, ok(Some("zz")));
        let v = not_linearizable(&h);
        assert_eq!(v.ops(), &[r]);
        assert!(
            v.to_string().contains("no operation on this key wrote"),
            "{v}"
        );
    }

    #[test]
    fn rejected_ops_are_checked() {
        // A CAS rejected although the register certainly held the expected value.
        let mut h = History::new();
        op(&mut h, 0, Op::write("a"), 0, 1, Outcome::Ok);
        let c = op(&mut h, 0, Op::cas(Some("a"), "b"), 2, 3, Outcome::Rejected);
        assert_eq!(not_linearizable(&h).ops(), &[c]);
        // A create rejected on an absent key.
        let mut h = History::new();
        let c = op(&mut h, 0, Op::create("a"), 0, 1, Outcome::Rejected);
        assert_eq!(not_linearizable(&h).ops(), &[c]);
        // Two creates both succeeding.
        let mut h = History::new();
        op(&mut h, 0, Op::create("a"), 0, 3, Outcome::Ok);
        op(&mut h, 1, Op::create("b"), 1, 2, Outcome::Ok);
        not_linearizable(&h);
        // An unknown write explains a rejection.
        let mut h = History::new();
        op(&mut h, 0, Op::write("a"), 0, 1, Outcome::Ok);
        unknown(&mut h, 1, Op::write("x"), 2, 3);
        op(&mut h, 0, Op::cas(Some("a"), "b"), 4, 5, Outcome::Rejected);
        check(&h).unwrap();
    }

    #[test]
    fn keys_are_independent() {
        let mut h = History::new();
        let ev = |key: &str, op: Op, inv, ret, outcome| Event {
            client: 0,
            key: key.to_string(),
            op,
            invoked: inv,
            completed: Some(ret),
            outcome,
        };
        h.push(ev("x", Op::write("a"), 0, 1, Outcome::Ok));
        h.push(ev("y", Op::Read, 2, 3, ok(None)));
        h.push(ev("y", Op::write("a"), 4, 5, Outcome::Ok));
        h.push(ev("x", Op::Read, 6, 7, ok(Some("a"))));
        assert_eq!(check(&h).unwrap().keys, 2);
        h.push(ev("y", Op::write("b"), 8, 9, Outcome::Ok));
        let stale = h.push(ev("y", Op::Read, 10, 11, ok(Some("a"))));
        let v = not_linearizable(&h);
        assert_eq!(v.key(), "y");
        assert!(v.ops().contains(&stale), "{v}");
    }

    #[test]
    #[should_panic(expected = "completed twice")]
    fn completing_twice_panics() {
        let mut h = History::new();
        let w = h.invoke(0, K, Op::write("a"));
        h.complete(w, Outcome::Ok);
        h.complete(w, Outcome::Ok);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn mismatched_outcome_panics() {
        let mut h = History::new();
        let r = h.invoke(0, K, Op::Read);
        h.complete(r, Outcome::Ok);
    }

    /// xorshift64*: small, deterministic, good enough for tests.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn percent(&mut self, p: u64) -> bool {
            self.below(100) < p
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len() as u64) as usize]
        }
    }

    /// A linearizable history: `n` ops by `clients` sequential clients on `keys`, each op
    /// taking effect at a random point of its interval on a simulated register;
    /// `unknown_pct` percent of the ops end unknown, and half of those take effect at a
    /// random time after their invocation (possibly long after the client gave up).
    fn generate(seed: u64, clients: usize, n: usize, keys: &[&str], unknown_pct: u64) -> History {
        struct G {
            client: usize,
            key: String,
            kind: u64,
            inv: u64,
            ret: u64,
            effect: Option<u64>,
            unknown: bool,
            op: Op,
            outcome: Outcome,
        }
        let mut rng = Rng::new(seed);
        let mut free_at = vec![0u64; clients];
        let mut ops = Vec::with_capacity(n);
        for _ in 0..n {
            let client = (0..clients).min_by_key(|&c| free_at[c]).unwrap();
            let inv = free_at[client] + rng.below(10);
            let dur = if rng.percent(5) {
                1 + rng.below(300)
            } else {
                1 + rng.below(40)
            };
            let unknown = rng.percent(unknown_pct);
            let effect = if !unknown {
                Some(inv + rng.below(dur + 1))
            } else if rng.percent(50) {
                Some(inv + rng.below(dur + 1000))
            } else {
                None
            };
            free_at[client] = inv + dur + 1;
            ops.push(G {
                client,
                key: rng.pick(keys).to_string(),
                kind: rng.below(10),
                inv,
                ret: inv + dur,
                effect,
                unknown,
                op: Op::Read,
                outcome: Outcome::Unknown,
            });
        }
        let mut fresh = 0;
        let mut fresh_value = || {
            fresh += 1;
            format!("v{fresh}")
        };
        let mut order: Vec<usize> = (0..n).filter(|&i| ops[i].effect.is_some()).collect();
        order.sort_by_key(|&i| (ops[i].effect, i));
        let mut state: HashMap<String, Option<String>> = HashMap::new();
        let mut past: HashMap<String, Vec<String>> = HashMap::new();
        for i in order {
            let g = &mut ops[i];
            let cur = state.get(&g.key).cloned().flatten();
            let old = past.entry(g.key.clone()).or_default();
            let outcome;
            match g.kind {
                0..=3 => outcome = Outcome::Read(cur),
                4..=5 => {
                    let v = fresh_value();
                    g.op = Op::Write(v.clone());
                    old.push(v.clone());
                    state.insert(g.key.clone(), Some(v));
                    outcome = Outcome::Ok;
                }
                6..=8 => {
                    let expected = if rng.percent(70) || old.is_empty() {
                        cur.clone()
                    } else if rng.percent(80) {
                        Some(rng.pick(old).clone())
                    } else {
                        None
                    };
                    let new = fresh_value();
                    outcome = if expected == cur {
                        old.push(new.clone());
                        state.insert(g.key.clone(), Some(new.clone()));
                        Outcome::Ok
                    } else {
                        Outcome::Rejected
                    };
                    g.op = Op::Cas { expected, new };
                }
                _ => {
                    let v = fresh_value();
                    outcome = if cur.is_none() {
                        old.push(v.clone());
                        state.insert(g.key.clone(), Some(v.clone()));
                        Outcome::Ok
                    } else {
                        Outcome::Rejected
                    };
                    g.op = Op::Create(v);
                }
            }
            g.outcome = if g.unknown { Outcome::Unknown } else { outcome };
        }
        // Unknown ops that never took effect.
        for g in ops.iter_mut().filter(|g| g.effect.is_none()) {
            g.op = match g.kind {
                0..=3 => Op::Read,
                4..=5 => Op::Write(fresh_value()),
                6..=8 => Op::Cas {
                    expected: past.get(&g.key).and_then(|o| o.last().cloned()),
                    new: fresh_value(),
                },
                _ => Op::Create(fresh_value()),
            };
        }
        ops.sort_by_key(|g| g.inv);
        let mut h = History::new();
        for g in ops {
            h.push(Event {
                client: g.client,
                key: g.key,
                op: g.op,
                invoked: g.inv,
                completed: Some(g.ret),
                outcome: g.outcome,
            });
        }
        h
    }

    /// Makes a read on `key` return a value certainly overwritten before it was invoked:
    /// one written by an op that completed before another write that completed before
    /// the read. Returns the read, or `None` if the history has no such shape.
    fn make_a_read_stale(h: &mut History, key: &str, rng: &mut Rng) -> Option<OpId> {
        let evs = &h.events;
        let puts: Vec<usize> = (0..evs.len())
            .filter(|&i| {
                evs[i].key == key
                    && evs[i].outcome == Outcome::Ok
                    && written_value(&evs[i]).is_some()
            })
            .collect();
        let mut reads: Vec<usize> = (0..evs.len())
            .filter(|&i| evs[i].key == key && matches!(evs[i].outcome, Outcome::Read(_)))
            .collect();
        // Start from a random read.
        let start = rng.below(reads.len().max(1) as u64) as usize;
        reads.rotate_left(start);
        for r in reads {
            let inv = evs[r].invoked;
            let Some(&y) = puts
                .iter()
                .filter(|&&y| evs[y].completed.unwrap() < inv)
                .max_by_key(|&&y| evs[y].invoked)
            else {
                continue;
            };
            let Some(&x) = puts
                .iter()
                .find(|&&x| evs[x].completed.unwrap() < evs[y].invoked)
            else {
                continue;
            };
            let stale = written_value(&evs[x]).unwrap().to_string();
            h.events[r].outcome = Outcome::Read(Some(stale));
            return Some(OpId(r));
        }
        None
    }

    #[test]
    fn random_linearizable_histories_pass_and_mutations_fail() {
        let mut rng = Rng::new(7);
        let mut stale_reads = 0;
        for seed in 0..200 {
            let clients = 1 + (seed % 8) as usize;
            let n = 10 + (seed as usize * 7) % 300;
            let keys: &[&str] = if seed % 3 == 0 {
                &["a", "b", "c"]
            } else {
                &["a"]
            };
            let h = generate(seed, clients, n, keys, seed % 10);
            if let Err(v) = check(&h) {
                panic!("seed {seed}: generated history rejected: {v}");
            }

            // A read of a value never written.
            let reads: Vec<usize> = (0..h.len())
                .filter(|&i| matches!(h.events[i].outcome, Outcome::Read(_)))
                .collect();
            if let Some(&r) = reads.get(rng.below(reads.len().max(1) as u64) as usize) {
                let mut bad = h.clone();
                bad.events[r].outcome = Outcome::read(Some("never-written"));
                let v = not_linearizable(&bad);
                assert_eq!(
                    (v.key(), v.ops()),
                    (h.events[r].key.as_str(), &[OpId(r)][..])
                );
            }

            // A stale read: this needs the search to find out.
            let mut bad = h.clone();
            if make_a_read_stale(&mut bad, "a", &mut rng).is_some() {
                stale_reads += 1;
                let v = not_linearizable(&bad);
                assert_eq!(v.key(), "a", "seed {seed}: {v}");
            }
        }
        assert!(stale_reads > 100, "only {stale_reads} stale reads tried");
    }

    #[test]
    fn large_history_2000_ops_8_clients_is_decided() {
        let h = generate(42, 8, 2000, &[K], 3);
        let s = check(&h).unwrap();
        assert_eq!(s.completed + s.unknown + s.ignored, 2000);
        assert!(s.unknown > 0);

        // Also decided when it fails: a stale read somewhere.
        let mut bad = h.clone();
        let mut rng = Rng::new(1);
        make_a_read_stale(&mut bad, K, &mut rng).unwrap();
        not_linearizable(&bad);

        // And a budget makes it undecided rather than running forever.
        match check_with_budget(&h, 100) {
            Err(v) if v.is_undecided() => assert!(v.to_string().contains("undecided"), "{v}"),
            other => panic!("expected undecided, got {other:?}"),
        }
    }

    /// Exhaustive reference: tries every order of every subset of the unknown-outcome ops
    /// with all the completed ones.
    fn brute_force(h: &History) -> bool {
        let mut keys: Vec<&str> = h.events.iter().map(|e| e.key.as_str()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter().all(|key| {
            let ops: Vec<&Event> = h
                .events
                .iter()
                .filter(|e| e.key == key)
                .filter(|e| {
                    !matches!(
                        (&e.op, &e.outcome),
                        (_, Outcome::NotApplied) | (Op::Read, Outcome::Unknown)
                    )
                })
                .collect();
            brute_force_from(&ops, 0, None)
        })
    }

    fn brute_force_from(ops: &[&Event], used: u32, cur: Option<&str>) -> bool {
        let ret = |e: &Event| match e.outcome {
            Outcome::Unknown => u64::MAX,
            _ => e.completed.unwrap(),
        };
        let unused = |i: usize| used & (1 << i) == 0;
        if (0..ops.len()).all(|i| !unused(i) || ops[i].outcome == Outcome::Unknown) {
            return true;
        }
        for j in (0..ops.len()).filter(|&j| unused(j)) {
            if (0..ops.len()).any(|i| i != j && unused(i) && ret(ops[i]) < ops[j].invoked) {
                continue;
            }
            let e = ops[j];
            let next = match (&e.op, &e.outcome) {
                (Op::Read, Outcome::Read(v)) => (v.as_deref() == cur).then_some(cur),
                (Op::Write(v), _) => Some(Some(v.as_str())),
                (Op::Cas { expected, new }, Outcome::Ok) => {
                    (expected.as_deref() == cur).then_some(Some(new.as_str()))
                }
                (Op::Cas { expected, .. }, Outcome::Rejected) => {
                    (expected.as_deref() != cur).then_some(cur)
                }
                (Op::Cas { expected, new }, _) => Some(if expected.as_deref() == cur {
                    Some(new.as_str())
                } else {
                    cur
                }),
                (Op::Create(v), Outcome::Ok) => cur.is_none().then_some(Some(v.as_str())),
                (Op::Create(_), Outcome::Rejected) => cur.is_some().then_some(cur),
                (Op::Create(v), _) => Some(Some(cur.unwrap_or(v))),
                _ => unreachable!(),
            };
            if let Some(next) = next {
                if brute_force_from(ops, used | 1 << j, next) {
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        let mut rng = Rng::new(3);
        let values = [None, Some("a"), Some("b"), Some("c")];
        let (mut passed, mut failed) = (0, 0);
        for round in 0..4000 {
            let mut h = History::new();
            let n = 1 + rng.below(7);
            for _ in 0..n {
                let inv = rng.below(12);
                let ret = inv + rng.below(6);
                // Values need not be unique here: the checker must not rely on it.
                let v = rng.pick(&values[1..]).unwrap();
                let (op, outcome) = match rng.below(4) {
                    0 => (Op::Read, Outcome::read(*rng.pick(&values))),
                    1 => (Op::write(v), Outcome::Ok),
                    2 => {
                        let expected = *rng.pick(&values);
                        let o = if rng.percent(50) {
                            Outcome::Ok
                        } else {
                            Outcome::Rejected
                        };
                        (Op::cas(expected, v), o)
                    }
                    _ => {
                        let o = if rng.percent(50) {
                            Outcome::Ok
                        } else {
                            Outcome::Rejected
                        };
                        (Op::create(v), o)
                    }
                };
                let outcome = match rng.below(10) {
                    0 | 1 => Outcome::Unknown,
                    2 => Outcome::NotApplied,
                    _ => outcome,
                };
                let key = if rng.percent(80) { "k" } else { "j" };
                h.push(Event {
                    client: rng.below(3) as usize,
                    key: key.to_string(),
                    op,
                    invoked: inv,
                    completed: Some(ret),
                    outcome,
                });
            }
            let expected = brute_force(&h);
            let got = check(&h);
            assert_eq!(
                got.is_ok(),
                expected,
                "round {round}: checker says {got:?}, brute force says {expected} for {:#?}",
                h.events
            );
            if expected {
                passed += 1;
            } else {
                failed += 1;
            }
        }
        assert!(
            passed > 500 && failed > 500,
            "{passed} passed, {failed} failed"
        );
    }
}
