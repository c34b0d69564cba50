//! Routing: which executions an event of one type goes to.
//!
//! An execution subscribes to a type with a key (`carModelUpdated(pk: 7)` by `id` 7) or
//! without one (`carCreated`). An event goes to the unkeyed executions of its type and to the
//! executions keyed by one of its keys (`LoggedEvent::keys`, computed once when it is decoded):
//! a hash lookup per key, then one queue push per execution it is for. So the hub's work per
//! event is proportional to the executions it is for, whatever the number of others.
//!
//! Each execution reads its own bounded queue (`FANOUT_BUFFER` events). An execution that lets
//! its queue fill up has fallen that far behind on events it would deliver. What happens then
//! depends on what it subscribes to:
//! - a state subscription (a record's `updated` events, keyed by its id: `carModelUpdated(pk)`)
//!   is conflated: the newest event that did not fit is held beside the queue ([`Latest`]),
//!   replacing the one held before, and is read after the queue; the result it becomes says how
//!   many it replaced. The subscriber gets the record's latest state, late but never cut off.
//!   Its reader does not wait for a full queue either: an event it takes that is older than
//!   OVERLOAD_LAG_MS makes it skip to the newest waiting ([`RouteReader::next`]).
//! - any other (created, deleted, unkeyed) cannot skip an event: its route is dropped and it is
//!   told (`slow`), and it closes its members as slow consumers (1013), who resume.
//!
//! A burst of events for other keys never touches its queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use events::{Key, LoggedEvent, Position};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, Notify};

/// The routes of one event type, and where its log stands.
pub(super) struct Topic {
    /// Executions that take every event of the type.
    unkeyed: Vec<Route>,
    /// Executions that take the events of one key, by that key.
    keyed: HashMap<Key, Vec<Route>>,
    /// Live subscriptions (their guards), routed or dropped for falling behind: the log is read
    /// while there are any.
    subscribers: usize,
    /// The last position read from each partition of the log; `None` until the partition's
    /// reader has read its tip.
    pub(super) positions: Vec<Option<Position>>,
}

/// One execution's queue.
pub(super) struct Route {
    id: u64,
    sender: mpsc::Sender<Arc<LoggedEvent>>,
    /// Told when the queue is full, before the route is dropped.
    slow: Arc<Notify>,
    /// A state subscription's overflow; `None`: a full queue drops the route.
    latest: Option<Arc<Latest>>,
}

impl Route {
    pub(super) fn new(
        id: u64,
        sender: mpsc::Sender<Arc<LoggedEvent>>,
        slow: Arc<Notify>,
        latest: Option<Arc<Latest>>,
    ) -> Self {
        Self {
            id,
            sender,
            slow,
            latest,
        }
    }

    /// Hands `event` on; false when the route has to go (its execution is gone, or behind on
    /// events it cannot skip).
    fn push(&self, event: &Arc<LoggedEvent>) -> bool {
        let Some(latest) = &self.latest else {
            return match self.sender.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    self.slow.notify_one();
                    false
                }
                Err(TrySendError::Closed(_)) => false,
            };
        };
        // Under the lock the reader takes the held event with: once one is held, every newer
        // one replaces it until the reader has taken it, so that nothing newer passes it in
        // the queue.
        let mut held = crate::lock(&latest.held);
        if let Some((older, skipped)) = held.as_mut() {
            *older = event.clone();
            *skipped += 1;
            return true;
        }
        match self.sender.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(event)) => {
                *held = Some((event, 0));
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// The overflow of a state subscription's queue: the newest event that did not fit, and how
/// many older ones it replaced.
#[derive(Default)]
pub struct Latest {
    held: Mutex<Option<(Arc<LoggedEvent>, u64)>>,
}

/// The reading end of a route: its queue, then what its [`Latest`] holds.
pub struct RouteReader {
    pub(super) receiver: mpsc::Receiver<Arc<LoggedEvent>>,
    pub(super) latest: Option<Arc<Latest>>,
    /// A state subscription's event appended longer ago than this (ms) is late: the reader
    /// skips to the newest it has waiting rather than work through the queue.
    pub(super) late_after_ms: u64,
}

impl RouteReader {
    /// The next event, and how many events of the route were skipped right before it (only
    /// ever for a state subscription past its queue). `None` once the route is gone.
    pub async fn next(&mut self) -> Option<(Arc<LoggedEvent>, u64)> {
        if let Some(latest) = &self.latest {
            let mut held = crate::lock(&latest.held);
            match self.receiver.try_recv() {
                // Nothing waits behind it (the usual case): nothing to skip to, no clock read.
                Ok(event)
                    if (held.is_none() && self.receiver.is_empty())
                        || !late(&event, self.late_after_ms) =>
                {
                    return Some((event, 0))
                }
                Ok(mut newest) => {
                    // Past capacity: the newest waiting supersedes the rest, held one last.
                    let mut skipped = 0;
                    while let Ok(later) = self.receiver.try_recv() {
                        newest = later;
                        skipped += 1;
                    }
                    if let Some((held_event, held_skipped)) = held.take() {
                        newest = held_event;
                        skipped += 1 + held_skipped;
                    }
                    return Some((newest, skipped));
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    if let Some(newest) = held.take() {
                        return Some(newest);
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return held.take(),
            }
        }
        // Nothing held: the queue's oldest, whenever it comes.
        self.receiver.recv().await.map(|event| (event, 0))
    }
}

impl Topic {
    /// A topic of a log in `partitions`, each at `tip` when the log knows it without a read.
    pub(super) fn new(partitions: u16, tip: Option<Position>) -> Self {
        Self {
            unkeyed: Vec::new(),
            keyed: HashMap::new(),
            subscribers: 0,
            positions: vec![tip; usize::from(partitions.max(1))],
        }
    }

    /// Whether every partition's position is known: every later event reaches the routes.
    pub(super) fn started(&self) -> bool {
        self.positions.iter().all(Option::is_some)
    }

    /// Where the partitions stand (one not started yet: at 0).
    pub(super) fn stands(&self) -> events::Positions {
        self.positions
            .iter()
            .map(|position| position.unwrap_or_default())
            .collect()
    }

    pub(super) fn add(&mut self, key: Option<Key>, route: Route) {
        self.subscribers += 1;
        match key {
            Some(key) => self.keyed.entry(key).or_default().push(route),
            None => self.unkeyed.push(route),
        }
    }

    /// Removes the route `id` (if the hub has not dropped it already); true when this was the
    /// type's last subscription.
    pub(super) fn remove(&mut self, key: Option<Key>, id: u64) -> bool {
        self.subscribers = self.subscribers.saturating_sub(1);
        match key {
            Some(key) => {
                if let Some(routes) = self.keyed.get_mut(&key) {
                    routes.retain(|route| route.id != id);
                    if routes.is_empty() {
                        self.keyed.remove(&key);
                    }
                }
            }
            None => self.unkeyed.retain(|route| route.id != id),
        }
        self.subscribers == 0
    }

    /// Drops every route, telling each it fell behind (its execution closes its members as
    /// slow consumers); returns how many.
    pub(super) fn drop_all(&mut self) -> usize {
        self.unkeyed
            .drain(..)
            .chain(self.keyed.drain().flat_map(|(_, routes)| routes))
            .inspect(|route| route.slow.notify_one())
            .count()
    }

    /// Hands `event` to every execution it is for.
    pub(super) fn deliver(&mut self, event: &Arc<LoggedEvent>) {
        push_all(&mut self.unkeyed, event);
        for key in &event.keys {
            if let Some(routes) = self.keyed.get_mut(key) {
                push_all(routes, event);
            }
        }
    }

    #[cfg(test)]
    fn routes(&self) -> usize {
        self.unkeyed.len() + self.keyed.values().map(Vec::len).sum::<usize>()
    }
}

/// Whether `event` was appended to its log more than `after_ms` ago (a Redis position is the
/// append's millisecond; the in-memory log's are counters and never late).
fn late(event: &LoggedEvent, after_ms: u64) -> bool {
    event.position.ms > 0
        && (chrono::Utc::now().timestamp_millis() as u64).saturating_sub(event.position.ms)
            > after_ms
}

/// Pushes `event` onto each route ([`Route::push`]); a route that cannot take it is dropped.
fn push_all(routes: &mut Vec<Route>, event: &Arc<LoggedEvent>) {
    routes.retain(|route| route.push(event));
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{AnyData, Envelope, EventType};

    fn event(position: u64, keys: Vec<Key>) -> Arc<LoggedEvent> {
        let data: AnyData = Arc::new(());
        Arc::new(LoggedEvent {
            event_type: EventType::new("thing.updated"),
            partition: 0,
            position: Position {
                ms: position,
                seq: 0,
            },
            cursor: Arc::from(""),
            envelope: Envelope::new(EventType::new("thing.updated"), data),
            keys,
            readers: events::Readers::Everyone,
        })
    }

    fn route(topic: &mut Topic, id: u64, key: Option<Key>, capacity: usize) -> Receiver {
        let (sender, receiver) = mpsc::channel(capacity);
        let slow = Arc::new(Notify::new());
        topic.add(key, Route::new(id, sender, slow.clone(), None));
        Receiver { receiver, slow }
    }

    /// A state subscription's route whose events are never late (the test events' positions
    /// are small numbers, milliseconds of 1970).
    fn state_route(topic: &mut Topic, id: u64, key: Key, capacity: usize) -> RouteReader {
        state_route_late_after(topic, id, key, capacity, u64::MAX)
    }

    fn state_route_late_after(
        topic: &mut Topic,
        id: u64,
        key: Key,
        capacity: usize,
        late_after_ms: u64,
    ) -> RouteReader {
        let (sender, receiver) = mpsc::channel(capacity);
        let latest = Some(Arc::new(Latest::default()));
        let slow = Arc::new(Notify::new());
        topic.add(Some(key), Route::new(id, sender, slow, latest.clone()));
        RouteReader {
            receiver,
            latest,
            late_after_ms,
        }
    }

    #[test]
    fn a_late_state_event_skips_to_the_newest_waiting() {
        let now = chrono::Utc::now().timestamp_millis() as u64;
        let mut topic = Topic::new(1, None);
        let mut state = state_route_late_after(&mut topic, 1, Key::id(1), 8, 1_000);
        // Three fresh events: read one by one.
        for n in 0..3 {
            topic.deliver(&event(now + n, vec![Key::id(1)]));
        }
        assert_eq!(read_now(&mut state).len(), 3);
        // Five appended two seconds ago, then one fresh: the first late one stands for all.
        for n in 0..5 {
            topic.deliver(&event(now - 2_000 + n, vec![Key::id(1)]));
        }
        topic.deliver(&event(now + 10, vec![Key::id(1)]));
        assert_eq!(read_now(&mut state), [(now + 10, 5)]);
    }

    fn read_now(reader: &mut RouteReader) -> Vec<(u64, u64)> {
        use futures_util::FutureExt as _;
        let mut read = Vec::new();
        while let Some(Some((event, skipped))) = reader.next().now_or_never() {
            read.push((event.position.ms, skipped));
        }
        read
    }

    #[test]
    fn a_full_state_queue_holds_the_newest_event_and_counts_what_it_replaced() {
        let mut topic = Topic::new(1, None);
        let mut state = state_route(&mut topic, 1, Key::id(1), 2);
        for n in 0..6 {
            topic.deliver(&event(n, vec![Key::id(1)]));
        }
        assert_eq!(topic.routes(), 1, "a state route is never dropped");
        // The queue's two, then the newest, standing for the three it replaced.
        assert_eq!(read_now(&mut state), [(0, 0), (1, 0), (5, 3)]);
        // Nothing held any more: the queue again, in order.
        for n in 6..8 {
            topic.deliver(&event(n, vec![Key::id(1)]));
        }
        assert_eq!(read_now(&mut state), [(6, 0), (7, 0)]);
    }

    #[test]
    fn while_an_event_is_held_nothing_newer_passes_it_in_the_queue() {
        use futures_util::FutureExt as _;
        let mut topic = Topic::new(1, None);
        let mut state = state_route(&mut topic, 1, Key::id(1), 2);
        for n in 0..3 {
            topic.deliver(&event(n, vec![Key::id(1)]));
        }
        // The reader takes one, which frees a place in the queue; the next event still goes
        // to the held place, after the one held already.
        let (first, _) = state.next().now_or_never().flatten().unwrap();
        assert_eq!(first.position.ms, 0);
        topic.deliver(&event(3, vec![Key::id(1)]));
        assert_eq!(read_now(&mut state), [(1, 0), (3, 1)]);
    }

    struct Receiver {
        receiver: mpsc::Receiver<Arc<LoggedEvent>>,
        slow: Arc<Notify>,
    }

    impl Receiver {
        fn positions(&mut self) -> Vec<u64> {
            let mut positions = Vec::new();
            while let Ok(event) = self.receiver.try_recv() {
                positions.push(event.position.ms);
            }
            positions
        }

        fn was_told_slow(&self) -> bool {
            use futures_util::FutureExt as _;
            self.slow.notified().now_or_never().is_some()
        }
    }

    #[test]
    fn an_event_reaches_its_keys_and_the_unkeyed_only() {
        let mut topic = Topic::new(1, None);
        let mut seven = route(&mut topic, 1, Some(Key::id(7)), 8);
        let mut eight = route(&mut topic, 2, Some(Key::id(8)), 8);
        let mut parent = route(&mut topic, 3, Some(Key::new("car", 7)), 8);
        let mut all = route(&mut topic, 4, None, 8);
        topic.deliver(&event(1, vec![Key::id(7)]));
        topic.deliver(&event(2, vec![Key::id(8)]));
        topic.deliver(&event(3, vec![Key::id(9), Key::new("car", 7)]));
        topic.deliver(&event(4, vec![Key::id(7)]));
        assert_eq!(seven.positions(), [1, 4], "its own key, in order");
        assert_eq!(eight.positions(), [2]);
        assert_eq!(parent.positions(), [3], "a key of another field");
        assert_eq!(all.positions(), [1, 2, 3, 4]);
    }

    #[test]
    fn a_burst_on_other_keys_never_fills_a_queue() {
        let mut topic = Topic::new(1, None);
        let mut quiet = route(&mut topic, 1, Some(Key::id(1)), 4);
        for n in 0..10_000 {
            topic.deliver(&event(n, vec![Key::id(2 + (n as i64 % 5_000))]));
        }
        assert!(!quiet.was_told_slow());
        assert!(quiet.positions().is_empty());
        topic.deliver(&event(10_000, vec![Key::id(1)]));
        assert_eq!(quiet.positions(), [10_000]);
    }

    #[test]
    fn a_full_queue_drops_its_route_and_says_so() {
        let mut topic = Topic::new(1, None);
        let mut stuck = route(&mut topic, 1, Some(Key::id(1)), 2);
        let mut other = route(&mut topic, 2, Some(Key::id(1)), 8);
        for n in 0..3 {
            topic.deliver(&event(n, vec![Key::id(1)]));
        }
        assert!(stuck.was_told_slow());
        assert!(!other.was_told_slow());
        assert_eq!(stuck.positions(), [0, 1], "what it holds, then the end");
        assert_eq!(other.positions(), [0, 1, 2]);
        assert_eq!(topic.routes(), 1);
        // Its guard still removes it; the topic lives while the other one does.
        assert!(!topic.remove(Some(Key::id(1)), 1));
        assert!(topic.remove(Some(Key::id(1)), 2));
    }
}
