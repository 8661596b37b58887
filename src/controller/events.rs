//! Events, off the critical path: the executor hands each Event to a bounded queue and
//! goes on; one task publishes them at most `--event-qps` per second (bursts of
//! `--event-burst`). When the queue is full (a burst of thousands of claims) an Event
//! is dropped and counted (`leasekeeper_events_dropped_total`): Events are best effort,
//! and client-go's recorder drops under load too; conditions carry the same facts.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{Quota, RateLimiter};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Reporter};
use tokio::sync::mpsc;

use super::writer::Writer;

use crate::arbiter::Note;
use crate::telemetry::Metrics;

/// Where the executor sends Events.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(Note, ObjectReference)>,
    metrics: Arc<Metrics>,
}

impl EventSink {
    /// Starts the publishing task.
    pub fn start(
        writer: Writer,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        qps: u32,
        burst: u32,
    ) -> EventSink {
        let capacity = usize::try_from(burst.max(1)).unwrap_or(1024) * 4;
        let (tx, rx) = mpsc::channel(capacity);
        tokio::spawn(publish_all(writer, reporter, rx, qps, burst));
        EventSink { tx, metrics }
    }

    /// Queues an Event without waiting; drops (and counts) it if the queue is full.
    pub fn send(&self, note: &Note, reference: ObjectReference) {
        if self.tx.try_send((note.clone(), reference)).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}

async fn publish_all(
    writer: Writer,
    reporter: Reporter,
    mut rx: mpsc::Receiver<(Note, ObjectReference)>,
    qps: u32,
    burst: u32,
) {
    let qps = NonZeroU32::new(qps.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let limiter = RateLimiter::direct(Quota::per_second(qps).allow_burst(burst));
    while let Some((note, reference)) = rx.recv().await {
        limiter.until_ready().await;
        publish(&writer, &reporter, &note, &reference).await;
    }
}

/// The API server refuses an Event whose note is longer than this (bytes).
const MAX_NOTE: usize = 1024;

/// The longest prefix of `s` within `max` bytes that ends on a character boundary.
fn fit(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Publishes one Event (through the writer: only within the leadership term); a
/// failure is logged, never fatal.
async fn publish(writer: &Writer, reporter: &Reporter, note: &Note, reference: &ObjectReference) {
    let ev = Event {
        type_: if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason.as_str().to_string(),
        note: Some(fit(&note.message, MAX_NOTE).to_string()),
        action: "Arbitrate".into(),
        secondary: None,
    };
    if let Err(e) = writer.event(reporter, &ev, reference).await {
        tracing::debug!(error = %e, reason = note.reason.as_str(), "cannot publish Event");
    }
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn a_long_note_is_cut_to_the_limit_on_a_character_boundary() {
        assert_eq!(fit("short", 1024), "short");
        let long = "é".repeat(600); // 1200 bytes
        let cut = fit(&long, 1024);
        assert_eq!(cut.len(), 1024);
        assert!(
            fit(&long, 1023).len() == 1022,
            "a cut inside a character moves back"
        );
    }
}
