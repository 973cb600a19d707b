//! Per-client rate limits: the operator's figure ("200mbit") and the
//! token bucket the programs run from it.

use std::{fmt, str::FromStr};

use nexd_common::exit::{BUCKET_FRAC_BITS, Bucket};
use serde::{Deserialize, Serialize};

/// A rate limit in one direction: a token bucket refilled at
/// `bits_per_second`, holding up to `burst_bytes`. A packet larger than
/// the burst never fits: keep it at least 64 KiB (a GRO aggregate), as
/// [`RateLimit::new`] and the parser do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RateLimit {
    pub bits_per_second: u64,
    pub burst_bytes: u64,
}

/// The burst a rate gets unless told otherwise: 50 ms at the rate (TCP
/// needs about a round trip's worth to reach a policed rate), at least
/// [`MIN_BURST_BYTES`].
pub const DEFAULT_BURST_MS: u64 = 50;

/// The smallest burst [`RateLimit::new`] gives: one GSO/GRO aggregate
/// (64 KiB) must fit, or such packets could never pass.
pub const MIN_BURST_BYTES: u64 = 64 * 1024;

/// Why a rate did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate {text:?}: expected a number of bits per second with an optional unit, \
     e.g. 200mbit, 1.5gbit, 800kbit (k/m/g are powers of 1000, as in tc)"
)]
pub struct RateParseError {
    pub text: String,
}

impl RateLimit {
    /// `bits_per_second` with the default burst.
    pub fn new(bits_per_second: u64) -> Self {
        let burst = (bits_per_second / 8).saturating_mul(DEFAULT_BURST_MS) / 1000;
        RateLimit {
            bits_per_second,
            burst_bytes: burst.max(MIN_BURST_BYTES),
        }
    }

    /// The bucket the programs run (time zero: full).
    pub fn bucket(&self) -> Bucket {
        // Bytes per second, in u128 so nothing here overflows.
        let rate = u128::from(self.bits_per_second.max(8)) / 8;
        let ns_per_byte = (1_000_000_000u128 << BUCKET_FRAC_BITS) / rate;
        Bucket {
            // At least 1: 0 would mean unlimited.
            ns_per_byte: u64::try_from(ns_per_byte).unwrap_or(u64::MAX).max(1),
            burst_ns: u64::try_from(u128::from(self.burst_bytes) * 1_000_000_000 / rate)
                .unwrap_or(u64::MAX),
            tat_ns: 0,
        }
    }
}

impl FromStr for RateLimit {
    type Err = RateParseError;

    /// `200mbit`, `1.5gbit`, `800kbit`, `100000` (bits per second),
    /// `200mbit/s`, `200 Mbit`; case-insensitive. Not `mbps` (tc reads it
    /// as megabytes, most people as megabits).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || RateParseError { text: s.to_owned() };
        let t = s.trim().to_ascii_lowercase();
        let t = t.strip_suffix("/s").unwrap_or(&t);
        // "bps" is left out on purpose: tc reads "mbps" as megabytes.
        let t = t.strip_suffix("bit").unwrap_or(t);
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: f64 = match unit.trim() {
            "" => 1.0,
            "k" => 1e3,
            "m" => 1e6,
            "g" => 1e9,
            _ => return Err(err()),
        };
        let n: f64 = num.parse().map_err(|_| err())?;
        let bits = n * mult;
        if !bits.is_finite() || !(1.0..=1e15).contains(&bits) {
            return Err(err());
        }
        Ok(RateLimit::new(bits.round() as u64))
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bits_per_second as f64;
        if b >= 1e9 {
            write!(f, "{} Gbit/s", trim(b / 1e9))
        } else if b >= 1e6 {
            write!(f, "{} Mbit/s", trim(b / 1e6))
        } else if b >= 1e3 {
            write!(f, "{} kbit/s", trim(b / 1e3))
        } else {
            write!(f, "{b} bit/s")
        }
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// A client's limits, each direction on its own (`None`: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientLimits {
    /// Traffic from the client (uploads).
    pub from_client: Option<RateLimit>,
    /// Traffic to the client (downloads).
    pub to_client: Option<RateLimit>,
}

impl ClientLimits {
    /// The same limit both ways (`exit_rate_limit = "200mbit"`).
    pub fn both(limit: RateLimit) -> Self {
        ClientLimits {
            from_client: Some(limit),
            to_client: Some(limit),
        }
    }

    /// The map value.
    pub fn to_map(self) -> nexd_common::exit::ClientLimit {
        let b = |l: Option<RateLimit>| l.map(|l| l.bucket()).unwrap_or_default();
        nexd_common::exit::ClientLimit {
            from_client: b(self.from_client),
            to_client: b(self.to_client),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_like_tc() {
        for (s, bits) in [
            ("200mbit", 200_000_000),
            ("200Mbit/s", 200_000_000),
            ("200 mbit", 200_000_000),
            ("1.5gbit", 1_500_000_000),
            ("800kbit", 800_000),
            ("100000", 100_000),
        ] {
            assert_eq!(
                s.parse::<RateLimit>().map(|r| r.bits_per_second),
                Ok(bits),
                "{s}"
            );
        }
        for s in [
            "", "fast", "200xbit", "-5mbit", "0", "mbit", "1e20", "50mbps",
        ] {
            assert!(s.parse::<RateLimit>().is_err(), "{s}");
        }
    }

    #[test]
    fn bursts_default_to_50ms_with_a_floor() {
        assert_eq!(RateLimit::new(200_000_000).burst_bytes, 1_250_000);
        assert_eq!(RateLimit::new(1_000_000).burst_bytes, MIN_BURST_BYTES);
    }

    #[test]
    fn buckets_hold_the_burst_as_time() {
        let b = RateLimit {
            bits_per_second: 8_000,
            burst_bytes: 500,
        }
        .bucket();
        // 1000 bytes/s: a byte takes 1 ms.
        assert_eq!(b.ns_per_byte >> BUCKET_FRAC_BITS, 1_000_000);
        assert_eq!(b.burst_ns, 500_000_000);
        // 10 Gbit/s: 0.8 ns a byte, kept to 1/65536 ns.
        let fast = RateLimit::new(10_000_000_000).bucket();
        assert_eq!(fast.ns_per_byte, 52_428);
        // A 1500-byte packet at 10 Gbit/s costs 1200 ns (to 0.01%).
        let cost = (1500 * fast.ns_per_byte) >> BUCKET_FRAC_BITS;
        assert!((1199..=1200).contains(&cost), "{cost}");
        assert_eq!(b.tat_ns, 0);
    }

    #[test]
    fn rates_display_in_the_largest_unit() {
        assert_eq!(RateLimit::new(200_000_000).to_string(), "200 Mbit/s");
        assert_eq!(RateLimit::new(1_500_000_000).to_string(), "1.5 Gbit/s");
        assert_eq!(RateLimit::new(800_000).to_string(), "800 kbit/s");
    }

    #[test]
    fn an_unlimited_direction_is_a_zero_rate() {
        let m = ClientLimits {
            from_client: Some(RateLimit::new(1_000_000)),
            to_client: None,
        }
        .to_map();
        assert_eq!(m.from_client.ns_per_byte >> BUCKET_FRAC_BITS, 8_000);
        assert_eq!(m.to_client.ns_per_byte, 0);
    }
}
