//! Refused subscriptions, logged as one line per episode instead of one
//! per filter.
//!
//! Filters are refused in bulk: a client past its bound (or every client,
//! once the router's bound is reached) may send thousands of them within
//! seconds, and a warning each would flood the log and cost more than the
//! refusal. So the first refusal of an episode starts it, later ones are
//! counted, and [`REPORT_AFTER`] later the episode ends with one line
//! carrying the count. A client that keeps being refused gets at most one
//! line per [`REPORT_AFTER`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long an episode gathers refusals before its line is written: long
/// enough to take in a burst, short enough for an operator to see it soon.
pub const REPORT_AFTER: Duration = Duration::from_secs(5);

/// What was refused in one episode.
#[derive(Debug, PartialEq, Eq)]
pub struct Episode {
    pub refused: u64,
    /// The first client refused and its filter, as the client wrote it.
    pub first_client_id: String,
    pub first_filter: String,
    /// Distinct clients refused.
    pub clients: HashSet<String>,
}

/// The episode under way, if any; clones share it.
#[derive(Clone, Default)]
pub struct Refusals(Arc<Mutex<Option<Episode>>>);

impl Refusals {
    /// Counts one refusal. The first of an episode hands back `true`: the
    /// caller then owes the episode's line, written by
    /// [`Refusals::report_later`].
    fn note(&self, client_id: &str, filter: &str) -> bool {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match open.as_mut() {
            Some(episode) => {
                episode.refused += 1;
                if !episode.clients.contains(client_id) {
                    episode.clients.insert(client_id.to_string());
                }
                false
            }
            None => {
                *open = Some(Episode {
                    refused: 1,
                    first_client_id: client_id.to_string(),
                    first_filter: filter.to_string(),
                    clients: HashSet::from([client_id.to_string()]),
                });
                true
            }
        }
    }

    /// Ends the episode under way and hands it back.
    fn take(&self) -> Option<Episode> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Counts one refusal of `filter` for `client_id`; the first of an
    /// episode has `report` called with the whole episode [`REPORT_AFTER`]
    /// later (from a task: call it inside the runtime).
    pub fn refuse(
        &self,
        client_id: &str,
        filter: &str,
        report: impl FnOnce(Episode) + Send + 'static,
    ) {
        if self.note(client_id, filter) {
            self.report_later(report);
        }
    }

    fn report_later(&self, report: impl FnOnce(Episode) + Send + 'static) {
        let refusals = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REPORT_AFTER).await;
            if let Some(episode) = refusals.take() {
                report(episode);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_episode_counts_every_refusal_and_the_next_one_starts_afresh() {
        let r = Refusals::default();
        assert!(r.note("a", "x/1"), "the first refusal starts an episode");
        assert!(!r.note("a", "x/2"));
        assert!(!r.note("b", "x/3"));
        let episode = r.take().expect("an episode");
        assert_eq!(episode.refused, 3);
        assert_eq!(
            (
                episode.first_client_id.as_str(),
                episode.first_filter.as_str()
            ),
            ("a", "x/1")
        );
        assert_eq!(episode.clients.len(), 2);
        assert_eq!(r.take(), None);
        assert!(
            r.note("b", "x/4"),
            "a refusal after the line starts another"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_report_per_episode_with_its_count() {
        let r = Refusals::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..100 {
            let tx = tx.clone();
            r.refuse("greedy", &format!("f/{i}"), move |e| {
                let _ = tx.send(e.refused);
            });
        }
        let reported = tokio::time::timeout(REPORT_AFTER * 2, rx.recv()).await;
        assert_eq!(reported.expect("reported in time"), Some(100));
        drop(tx);
        assert_eq!(rx.recv().await, None, "one line for the episode");
    }
}
