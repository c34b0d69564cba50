//! How subscribers and events are spread over the keys (car pks) of a run: in turn (uniform), by
//! a Zipf law (a few popular cars, a long tail), or a hot key beside many distinct ones. Each
//! subscriber's and each event's key is a function of its index, so a run is repeatable and
//! the orchestrator knows how many subscribers each event is for.

use rand::{Rng as _, SeedableRng as _};

use super::args::{Distribution, SubscribeArgs};

/// The key index (into `--pks`) of every subscriber and every measured event.
pub(super) struct Spread {
    keys: usize,
    distribution: Distribution,
    /// Zipf's cumulative weights over the keys (hot key excluded), when Zipf.
    cumulative: Vec<f64>,
    /// Subscribers on key 0 before the others are spread over the rest.
    hot_subscribers: u32,
    /// Share of the events that go to key 0 when there is a hot key.
    hot_share: f64,
}

impl Spread {
    pub(super) fn new(args: &SubscribeArgs) -> Spread {
        let keys = args.pks.len();
        let hot = args.hot_subscribers.is_some();
        // With a hot key, the others are spread over the keys after it.
        let spread_over = if hot { keys - 1 } else { keys };
        let cumulative = match args.distribution {
            Distribution::Zipf => {
                let mut total = 0.0;
                (1..=spread_over)
                    .map(|rank| {
                        total += 1.0 / (rank as f64).powf(args.zipf_exponent);
                        total
                    })
                    .collect()
            }
            Distribution::Uniform => Vec::new(),
        };
        Spread {
            keys,
            distribution: args.distribution,
            cumulative,
            hot_subscribers: args.hot_subscribers.unwrap_or(0),
            hot_share: if hot { args.hot_event_share } else { 0.0 },
        }
    }

    /// The key of subscriber `index`.
    pub(super) fn subscriber(&self, index: u32) -> usize {
        if self.hot_subscribers > 0 {
            if index < self.hot_subscribers {
                return 0;
            }
            return 1 + self.spread(u64::from(index - self.hot_subscribers), SUBSCRIBERS);
        }
        self.spread(u64::from(index), SUBSCRIBERS)
    }

    /// The key of measured event `k`.
    pub(super) fn event(&self, k: usize) -> usize {
        let k = k as u64;
        if self.hot_subscribers > 0 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(k ^ HOT);
            if rng.gen_bool(self.hot_share.clamp(0.0, 1.0)) {
                return 0;
            }
            return 1 + self.spread(k, EVENTS);
        }
        self.spread(k, EVENTS)
    }

    /// Index `n` of a stream (`salt`) spread over the keys after the hot one, if any.
    fn spread(&self, n: u64, salt: u64) -> usize {
        let keys = if self.hot_subscribers > 0 {
            self.keys - 1
        } else {
            self.keys
        };
        match self.distribution {
            Distribution::Uniform => (n % keys as u64) as usize,
            Distribution::Zipf => {
                let total = self.cumulative.last().copied().unwrap_or(1.0);
                let draw = rand::rngs::StdRng::seed_from_u64(n ^ salt).gen::<f64>() * total;
                self.cumulative
                    .partition_point(|weight| *weight < draw)
                    .min(keys - 1)
            }
        }
    }
}

/// Seeds of the three streams of draws, so that subscriber n and event n do not get the same.
const SUBSCRIBERS: u64 = 0x5ab5_c71b_e500_0000;
const EVENTS: u64 = 0xe7e7_0000_0000_0001;
const HOT: u64 = 0x4070_0000_0000_0002;

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn spread(extra: &[&str]) -> (Spread, usize) {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: SubscribeArgs,
        }
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        let mut args = Cli::try_parse_from(argv).expect("valid arguments").args;
        args.validate().expect("valid combination");
        let keys = args.pks.len();
        (Spread::new(&args), keys)
    }

    #[test]
    fn uniform_deals_keys_in_turn() {
        let (spread, keys) = spread(&["--keys", "4"]);
        assert_eq!(keys, 4);
        let subscribers: Vec<usize> = (0..8).map(|i| spread.subscriber(i)).collect();
        assert_eq!(subscribers, [0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(spread.event(5), 1);
    }

    #[test]
    fn zipf_favours_the_first_keys_and_reaches_the_tail() {
        let (spread, keys) = spread(&["--keys", "1000", "--distribution", "zipf"]);
        let mut counts = vec![0u32; keys];
        for i in 0..100_000 {
            counts[spread.subscriber(i)] += 1;
        }
        assert!(
            counts[0] > counts[1] && counts[1] > counts[9],
            "{:?}",
            &counts[..10]
        );
        assert!(counts[0] > 10_000, "{}", counts[0]);
        assert!(counts[500..].iter().any(|n| *n > 0), "the tail is reached");
    }

    #[test]
    fn a_hot_key_takes_its_subscribers_and_its_share_of_events() {
        let (spread, keys) = spread(&[
            "--keys",
            "101",
            "--hot-subscribers",
            "50",
            "--hot-event-share",
            "0.5",
        ]);
        assert_eq!(keys, 101);
        assert!((0..50).all(|i| spread.subscriber(i) == 0));
        let others: Vec<usize> = (50..150).map(|i| spread.subscriber(i)).collect();
        assert!(others.iter().all(|key| (1..101).contains(key)));
        let hot = (0..10_000).filter(|k| spread.event(*k) == 0).count();
        assert!((4_000..6_000).contains(&hot), "{hot}");
    }
}
