//! Routing: which executions an event of one type goes to.
//!
//! An execution subscribes to a type with a key (`carModelUpdated(pk: 7)` by `id` 7) or
//! without one (`carCreated`). An event goes to the unkeyed executions of its type and to the
//! executions keyed by one of its keys (`LoggedEvent::keys`, computed once when it is decoded):
//! a hash lookup per key, then one queue push per execution it is for. So the hub's work per
//! event is proportional to the executions it is for, whatever the number of others.
//!
//! Each execution reads its own bounded queue (`FANOUT_BUFFER` events). An execution that lets
//! its queue fill up has fallen that far behind on events it would deliver: its route is
//! dropped and it is told (`slow`), and it closes its members as slow consumers (1013), who
//! resume. A burst of events for other keys never touches its queue.

use std::collections::HashMap;
use std::sync::Arc;

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
    /// The last position read from the log; `None` until the Redis task has read its tip.
    pub(super) position: Option<Position>,
}

/// One execution's queue.
pub(super) struct Route {
    id: u64,
    sender: mpsc::Sender<Arc<LoggedEvent>>,
    /// Told when the queue is full, before the route is dropped.
    slow: Arc<Notify>,
}

impl Route {
    pub(super) fn new(id: u64, sender: mpsc::Sender<Arc<LoggedEvent>>, slow: Arc<Notify>) -> Self {
        Self { id, sender, slow }
    }
}

impl Topic {
    pub(super) fn new(position: Option<Position>) -> Self {
        Self {
            unkeyed: Vec::new(),
            keyed: HashMap::new(),
            subscribers: 0,
            position,
        }
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

/// Pushes `event` onto each route's queue; a full queue drops its route (its execution is told),
/// a closed one (the execution is gone) is dropped quietly.
fn push_all(routes: &mut Vec<Route>, event: &Arc<LoggedEvent>) {
    routes.retain(|route| match route.sender.try_send(event.clone()) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            route.slow.notify_one();
            false
        }
        Err(TrySendError::Closed(_)) => false,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::{AnyData, Envelope, EventType};

    fn event(position: u64, keys: Vec<Key>) -> Arc<LoggedEvent> {
        let data: AnyData = Arc::new(());
        Arc::new(LoggedEvent {
            event_type: EventType::new("thing.updated"),
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
        topic.add(key, Route::new(id, sender, slow.clone()));
        Receiver { receiver, slow }
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
        let mut topic = Topic::new(None);
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
        let mut topic = Topic::new(None);
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
        let mut topic = Topic::new(None);
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
