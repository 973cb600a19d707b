//! Rates as the mesh file writes them (`exit_rate_limit = "200mbit"`).
//!
//! The units are tc's and iperf3's for bits, decimal (1 kbit = 1,000
//! bit/s): `bit`, `kbit`, `mbit`, `gbit`. Bytes are accepted too, spelled
//! out so they cannot be mistaken for bits: `byte`, `kbyte`, `mbyte`,
//! `gbyte` (1 kbyte = 8,000 bit/s). tc's own `kbps` means kilo*bytes* and
//! is a classic trap, so `bps`-style units are rejected with a hint.
//! A decimal number is allowed (`"1.5gbit"`) when the result is a whole
//! number of bits per second, and `/s` may follow the unit (`"200mbit/s"`).

use std::fmt;

use serde::Serialize;

/// The smallest limit accepted: below this a token bucket passes less
/// than one full-size packet per 100 ms, which stalls TCP rather than
/// shaping it.
pub const MIN_BITS_PER_SECOND: u64 = 100_000;
/// The largest limit accepted (1 Tbit/s): above any link nexd runs on.
pub const MAX_BITS_PER_SECOND: u64 = 1_000_000_000_000;

/// A rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Rate {
    bits_per_second: u64,
}

impl Rate {
    /// A rate of `bits_per_second`, if it is inside the accepted range.
    pub fn from_bits_per_second(bits_per_second: u64) -> Option<Self> {
        (MIN_BITS_PER_SECOND..=MAX_BITS_PER_SECOND)
            .contains(&bits_per_second)
            .then_some(Rate { bits_per_second })
    }

    pub fn bits_per_second(self) -> u64 {
        self.bits_per_second
    }

    /// Bytes per second, rounded down: what a token bucket counting packet
    /// bytes refills with.
    pub fn bytes_per_second(self) -> u64 {
        self.bits_per_second / 8
    }
}

impl fmt::Display for Rate {
    /// The largest unit that shows the rate exactly: `200mbit`, `1500kbit`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bits_per_second;
        for (unit, mult) in [
            ("gbit", 1_000_000_000),
            ("mbit", 1_000_000),
            ("kbit", 1_000),
        ] {
            if b.is_multiple_of(mult) {
                return write!(f, "{}{unit}", b / mult);
            }
        }
        write!(f, "{b}bit")
    }
}

/// Parses `"200mbit"`, `"1.5 gbit"`, `"25mbyte"`; the message says what is
/// wrong and what is accepted.
pub fn parse(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = (&t[..split], t[split..].trim().to_ascii_lowercase());
    // "200mbit/s" says the same as "200mbit".
    let unit = unit.strip_suffix("/s").unwrap_or(&unit);
    let multiplier: u64 = match unit {
        "bit" => 1,
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        "byte" => 8,
        "kbyte" => 8_000,
        "mbyte" => 8_000_000,
        "gbyte" => 8_000_000_000,
        "" => {
            return Err(format!(
                "{s:?} has no unit (write e.g. \"200mbit\"; units: bit, kbit, mbit, gbit, byte, kbyte, mbyte, gbyte)"
            ));
        }
        u if u.ends_with("bps") || u.ends_with('b') => {
            return Err(format!(
                "{s:?}: unit {u:?} is ambiguous (tc reads \"kbps\" as kilobytes); write kbit, mbit, gbit for bits or kbyte, mbyte, gbyte for bytes"
            ));
        }
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (units: bit, kbit, mbit, gbit, byte, kbyte, mbyte, gbyte)"
            ));
        }
    };
    let bits = scale(number, multiplier).ok_or_else(|| {
        format!("{s:?} is not a number of bits per second (e.g. \"200mbit\", \"1.5gbit\")")
    })?;
    Rate::from_bits_per_second(bits).ok_or_else(|| {
        format!(
            "{s:?} is out of range ({} to {})",
            Rate {
                bits_per_second: MIN_BITS_PER_SECOND
            },
            Rate {
                bits_per_second: MAX_BITS_PER_SECOND
            }
        )
    })
}

/// `number` (digits, at most one '.') times `multiplier`, exactly, in
/// integers: `None` if it is not a number, overflows, or leaves a
/// fraction of a bit.
fn scale(number: &str, multiplier: u64) -> Option<u64> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) || frac.len() > 12 {
        return None;
    }
    let int_value: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut total = int_value.checked_mul(multiplier)?;
    if !frac.is_empty() {
        let denominator = 10u128.pow(u32::try_from(frac.len()).ok()?);
        let numerator = u128::from(frac.parse::<u64>().ok()?) * u128::from(multiplier);
        if numerator % denominator != 0 {
            return None;
        }
        total = total.checked_add(u64::try_from(numerator / denominator).ok()?)?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &str) -> u64 {
        parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .bits_per_second()
    }

    #[test]
    fn bit_and_byte_units_are_decimal() {
        assert_eq!(bits("200mbit"), 200_000_000);
        assert_eq!(bits("200Mbit"), 200_000_000);
        assert_eq!(bits("1.5gbit"), 1_500_000_000);
        assert_eq!(bits("500 kbit"), 500_000);
        assert_eq!(bits("200mbit/s"), 200_000_000);
        assert_eq!(bits("25 MByte/s"), 200_000_000);
        assert_eq!(bits("100000bit"), 100_000);
        assert_eq!(bits("25mbyte"), 200_000_000);
        assert_eq!(bits("12.5kbyte"), 100_000);
        assert_eq!(bits("1gbyte"), 8_000_000_000);
        assert_eq!(bits(".5gbit"), 500_000_000);
        assert_eq!(parse("25mbyte").map(Rate::bytes_per_second), Ok(25_000_000));
    }

    #[test]
    fn display_uses_the_largest_exact_unit() {
        assert_eq!(parse("200mbit").expect("ok").to_string(), "200mbit");
        assert_eq!(parse("1.5gbit").expect("ok").to_string(), "1500mbit");
        assert_eq!(parse("100001bit").expect("ok").to_string(), "100001bit");
        // What Display prints parses back to the same rate.
        for s in ["1gbit", "2.25mbit", "123456bit", "30kbyte"] {
            let r = parse(s).expect("ok");
            assert_eq!(parse(&r.to_string()), Ok(r), "{s}");
        }
    }

    #[test]
    fn bad_rates_say_why() {
        let err = |s: &str| parse(s).expect_err(s);
        assert!(err("200").contains("no unit"));
        assert!(err("200mbps").contains("ambiguous"));
        assert!(err("200kbps").contains("kilobytes"));
        assert!(err("200 mb/s").contains("ambiguous"));
        assert!(err("200MB").contains("ambiguous"));
        assert!(err("200furlongs").contains("unknown unit"));
        assert!(err("0mbit").contains("out of range"));
        assert!(err("99kbit").contains("out of range"));
        assert!(err("1001gbit").contains("out of range"));
        assert!(err("1.2.3mbit").contains("not a number"));
        assert!(err("0.0000001kbit").contains("not a number"));
        assert!(err("mbit").contains("not a number"));
        assert!(err(".mbit").contains("not a number"));
        assert!(err("-5mbit").contains("unknown unit"));
        assert!(err("99999999999999999999gbit").contains("not a number"));
    }
}
