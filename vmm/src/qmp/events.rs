//! QMP events, broadcast to every connected client that finished negotiation.
//!
//! An event on the wire (member order is QEMU's, see [`super::writer`]):
//! `{"timestamp": {"seconds": 1700000000, "microseconds": 123456}, "event": "STOP"}`
//! with `"data": {...}` after `"event"` when the event has data.
//!
//! [`EventBus`] is a cheap handle (clone it freely) that the VMM calls from
//! any thread. `emit` never blocks: every client has a bounded queue of
//! pending output drained by its own writer thread, and the event is only
//! offered to it. QEMU lets a client's output buffer grow without limit;
//! Ferry instead drops a client whose queue is full (it has stopped reading
//! for as long as it took `queue_len` messages to pile up), so a stuck or
//! vanished client costs a bounded amount of memory and never slows the VMM.
//! Like QEMU, events go only to clients that completed `qmp_capabilities`,
//! and a client sees an event only after the response that completed its
//! negotiation (see `Outgoing`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Sender, TrySendError};
use serde_json::{json, Map, Value};

use super::writer::to_qemu_line;

/// When an event happened: wall-clock time since the Unix epoch, as QEMU reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            microseconds: i64::from(since.subsec_micros()),
        }
    }
}

/// One QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `"STOP"` or `"MIGRATION"`.
    pub event: String,
    /// The event's data object, if it has one.
    pub data: Option<Value>,
    /// When it happened.
    pub timestamp: Timestamp,
}

impl Event {
    /// An event stamped with the current time.
    pub fn new(name: &str, data: Option<Value>) -> Event {
        Event {
            event: name.to_string(),
            data,
            timestamp: Timestamp::now(),
        }
    }

    /// The event as a JSON object.
    pub fn to_value(&self) -> Value {
        let mut map = Map::new();
        map.insert("event".into(), Value::String(self.event.clone()));
        if let Some(data) = &self.data {
            map.insert("data".into(), data.clone());
        }
        map.insert(
            "timestamp".into(),
            json!({"seconds": self.timestamp.seconds, "microseconds": self.timestamp.microseconds}),
        );
        Value::Object(map)
    }

    /// Reads an event message; `None` if `value` is not one.
    pub fn from_value(value: &Value) -> Option<Event> {
        let event = value.get("event")?.as_str()?.to_string();
        let ts = value.get("timestamp");
        let field = |name: &str| {
            ts.and_then(|t| t.get(name))
                .and_then(Value::as_i64)
                .unwrap_or(0)
        };
        Some(Event {
            event,
            data: value.get("data").cloned(),
            timestamp: Timestamp {
                seconds: field("seconds"),
                microseconds: field("microseconds"),
            },
        })
    }
}

/// Output waiting for a client's writer thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outgoing {
    /// A response (or the greeting), one line.
    Response(String),
    /// The response that completed negotiation: events written after it, not before.
    Negotiated(String),
    /// An event line, shared by all clients.
    Event(Arc<str>),
}

struct Subscriber {
    id: u64,
    tx: Sender<Outgoing>,
    negotiated: Arc<AtomicBool>,
    on_overflow: Box<dyn Fn() + Send + Sync>,
}

#[derive(Default)]
struct BusInner {
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: AtomicU64,
}

/// Handle for emitting events to all negotiated clients; clone it for any thread.
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("subscribers", &self.subscribers())
            .finish()
    }
}

impl EventBus {
    /// A bus with no clients.
    pub fn new() -> EventBus {
        EventBus::default()
    }

    /// Emits event `name` with optional `data` now; returns how many clients it was queued for.
    pub fn emit(&self, name: &str, data: Option<Value>) -> usize {
        self.emit_event(&Event::new(name, data))
    }

    /// Emits a prepared event; returns how many clients it was queued for.
    pub fn emit_event(&self, event: &Event) -> usize {
        let line: Arc<str> = Arc::from(to_qemu_line(&event.to_value()));
        let mut subscribers = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut delivered = 0;
        subscribers.retain(|sub| {
            if !sub.negotiated.load(Ordering::SeqCst) {
                return true;
            }
            match sub.tx.try_send(Outgoing::Event(line.clone())) {
                Ok(()) => {
                    delivered += 1;
                    true
                }
                Err(TrySendError::Full(_)) => {
                    // The client stopped reading: drop it rather than wait or grow.
                    (sub.on_overflow)();
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        delivered
    }

    /// Number of connected clients (negotiated or not).
    pub fn subscribers(&self) -> usize {
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Registers a client's output queue; it receives events once `negotiated` is true.
    pub(crate) fn subscribe(
        &self,
        tx: Sender<Outgoing>,
        negotiated: Arc<AtomicBool>,
        on_overflow: Box<dyn Fn() + Send + Sync>,
    ) -> Subscription {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Subscriber {
                id,
                tx,
                negotiated,
                on_overflow,
            });
        Subscription {
            bus: Arc::downgrade(&self.inner),
            id,
        }
    }
}

/// A client's registration with the bus; dropping it unsubscribes.
pub(crate) struct Subscription {
    bus: Weak<BusInner>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(bus) = self.bus.upgrade() {
            bus.subscribers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| s.id != self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;
    use std::sync::atomic::AtomicUsize;

    fn flag(v: bool) -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(v))
    }

    #[test]
    fn event_wire_format_is_qemus() {
        let ev = Event {
            event: "STOP".into(),
            data: None,
            timestamp: Timestamp {
                seconds: 1,
                microseconds: 2,
            },
        };
        assert_eq!(
            to_qemu_line(&ev.to_value()),
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n"
        );
        let with_data = Event {
            data: Some(json!({"status": "active"})),
            event: "MIGRATION".into(),
            ..ev
        };
        assert_eq!(Event::from_value(&with_data.to_value()), Some(with_data));
    }

    #[test]
    fn only_negotiated_clients_receive_events() {
        let bus = EventBus::new();
        let (tx_a, rx_a) = bounded(8);
        let (tx_b, rx_b) = bounded(8);
        let _a = bus.subscribe(tx_a, flag(true), Box::new(|| {}));
        let b_flag = flag(false);
        let _b = bus.subscribe(tx_b, b_flag.clone(), Box::new(|| {}));
        assert_eq!(bus.emit("STOP", None), 1);
        assert!(matches!(rx_a.try_recv(), Ok(Outgoing::Event(line)) if line.contains("\"STOP\"")));
        assert!(rx_b.try_recv().is_err());
        b_flag.store(true, Ordering::SeqCst);
        assert_eq!(bus.emit("RESUME", None), 2);
        assert!(rx_b.try_recv().is_ok());
    }

    #[test]
    fn a_full_queue_drops_the_client_without_blocking() {
        let bus = EventBus::new();
        let (tx, _rx) = bounded(2);
        let dropped = Arc::new(AtomicUsize::new(0));
        let d = dropped.clone();
        let _sub = bus.subscribe(
            tx,
            flag(true),
            Box::new(move || {
                d.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(bus.emit("A", None), 1);
        assert_eq!(bus.emit("B", None), 1);
        assert_eq!(bus.emit("C", None), 0);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        assert_eq!(bus.subscribers(), 0);
        assert_eq!(bus.emit("D", None), 0);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn dropping_the_subscription_or_the_receiver_unsubscribes() {
        let bus = EventBus::new();
        let (tx, rx) = bounded(2);
        let sub = bus.subscribe(tx, flag(true), Box::new(|| {}));
        assert_eq!(bus.subscribers(), 1);
        drop(sub);
        assert_eq!(bus.subscribers(), 0);
        drop(rx);
        let (tx, rx) = bounded(2);
        let _sub = bus.subscribe(tx, flag(true), Box::new(|| {}));
        drop(rx);
        assert_eq!(bus.emit("X", None), 0);
        assert_eq!(bus.subscribers(), 0);
    }

    #[test]
    fn emit_from_many_threads() {
        let bus = EventBus::new();
        let (tx, rx) = bounded(1000);
        let _sub = bus.subscribe(tx, flag(true), Box::new(|| {}));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        bus.emit("TICK", Some(json!({"n": 1})));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(rx.len(), 400);
    }
}
