//! What the node measures as it works, for `/metrics`: how long visits take
//! to open and how they end, and how long DHT lookups take and how many hops
//! they need. Cheap to clone (the metrics are shared).

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use specter_dht::Outcome;

/// Latency buckets: 250 µs doubling to about 8 s (loopback opens take well
/// under a millisecond; a lookup across continents and a hedged retry take
/// seconds).
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// A label set with one pair.
pub type Label = [(&'static str, &'static str); 1];

/// The node's histograms and outcome counters.
#[derive(Clone, Debug)]
pub struct Histograms {
    /// From a visitor's request for a tunnel to a stream to its client
    /// (seconds), for visits that opened.
    pub visit_open: Histogram,
    /// Visits by how their opening ended (`opened`, `unknown`,
    /// `unreachable`, `target_refused`, `not_ready`).
    pub visits: Family<Label, Counter>,
    /// DHT reads and writes started here, to their outcome (seconds).
    pub lookup: Histogram,
    /// Requests each DHT read or write took (0: this node holds the key).
    pub lookup_hops: Histogram,
}

/// Every outcome [`Histograms::visits`] counts, shown from 0.
pub const VISIT_OUTCOMES: [&str; 5] = [
    "opened",
    "unknown",
    "unreachable",
    "target_refused",
    "not_ready",
];

impl Default for Histograms {
    fn default() -> Self {
        let visits = Family::<Label, Counter>::default();
        for outcome in VISIT_OUTCOMES {
            let _ = visits.get_or_create(&[("outcome", outcome)]);
        }
        Histograms {
            visit_open: latency(),
            visits,
            lookup: latency(),
            lookup_hops: Histogram::new([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0]),
        }
    }
}

impl Histograms {
    /// Records a DHT operation that ended with `outcome` after `took`.
    pub fn lookup_done(&self, outcome: &Outcome, took: Duration) {
        self.lookup.observe(took.as_secs_f64());
        let hops = match outcome {
            Outcome::Got { hops, .. }
            | Outcome::Wrote { hops, .. }
            | Outcome::Unreachable { hops } => *hops,
            Outcome::Refused(_) => return,
        };
        self.lookup_hops.observe(f64::from(hops));
    }

    /// Records how a visit's opening ended, and its latency if it opened.
    pub fn visit_done(&self, outcome: &'static str, took: Option<Duration>) {
        self.visits.get_or_create(&[("outcome", outcome)]).inc();
        if let Some(took) = took {
            self.visit_open.observe(took.as_secs_f64());
        }
    }
}
