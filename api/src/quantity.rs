//! Kubernetes resource quantities (`500m`, `2`, `128Mi`, `1G`, `1e3`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A quantity as written by the user; parsed with [`Quantity::parse`] during validation, so
/// anything stored is known to parse.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Quantity(pub String);

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Quantity {
    fn from(s: &str) -> Self {
        Quantity(s.to_string())
    }
}

/// A parsed quantity, kept as an exact value in thousandths (milli-units) so `100m` CPU and
/// `1.5Gi` memory are both exact. Values above ~9.2e15 units are rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Parsed {
    pub millis: i128,
}

impl Quantity {
    pub fn parse(&self) -> Result<Parsed, String> {
        parse_quantity(&self.0)
    }
    /// CPU in millicores (`500m` → 500, `2` → 2000), rounded up like Kubernetes.
    pub fn cpu_millis(&self) -> Result<i64, String> {
        Ok(self.parse()?.millis.clamp(0, i64::MAX as i128) as i64)
    }
    /// A byte count (`128Mi` → 134217728), rounded up to a whole byte.
    pub fn bytes(&self) -> Result<i64, String> {
        let m = self.parse()?.millis;
        Ok(((m + 999).div_euclid(1000)).clamp(0, i64::MAX as i128) as i64)
    }
    pub fn from_millis_cpu(m: i64) -> Quantity {
        if m % 1000 == 0 {
            Quantity((m / 1000).to_string())
        } else {
            Quantity(format!("{m}m"))
        }
    }
    pub fn from_bytes(b: i64) -> Quantity {
        for (suffix, mult) in [("Gi", 1i64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if b != 0 && b % mult == 0 {
                return Quantity(format!("{}{suffix}", b / mult));
            }
        }
        Quantity(b.to_string())
    }
}

fn parse_quantity(s: &str) -> Result<Parsed, String> {
    let bad = || {
        format!(
            "quantities must match the regular expression \
             '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$', got {s:?}"
        )
    };
    if s.is_empty() {
        return Err(bad());
    }
    let num_end = s
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || ((*c == '+' || *c == '-') && *i == 0)))
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_end);
    if num.is_empty() || num == "+" || num == "-" || num.matches('.').count() > 1 {
        return Err(bad());
    }
    let negative = num.starts_with('-');
    let digits = num.trim_start_matches(['+', '-']);
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(bad());
    }
    if frac_part.len() > 9 || int_part.len() > 18 {
        return Err(bad());
    }
    // value = mantissa * 10^-frac_len
    let mantissa: i128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| bad())?;
    let frac_len = frac_part.len() as u32;

    // (numerator multiplier, decimal exponent)
    let (mult, exp10): (i128, i32) = match suffix {
        "" => (1, 0),
        "n" => (1, -9),
        "u" => (1, -6),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        other => {
            let exp = other
                .strip_prefix('e')
                .or_else(|| other.strip_prefix('E'))
                .ok_or_else(bad)?;
            let e: i32 = exp.parse().map_err(|_| bad())?;
            if !(-18..=18).contains(&e) {
                return Err(bad());
            }
            (1, e)
        }
    };
    // millis = mantissa * mult * 10^(exp10 + 3 - frac_len), rounded up (away from zero).
    let total_exp = exp10 + 3 - frac_len as i32;
    let base = mantissa.checked_mul(mult).ok_or_else(bad)?;
    let millis = if total_exp >= 0 {
        base.checked_mul(10i128.pow(total_exp as u32))
            .ok_or_else(bad)?
    } else {
        let d = 10i128.pow((-total_exp) as u32);
        (base + d - 1) / d
    };
    if millis > i64::MAX as i128 {
        return Err(format!("quantity {s:?} is too large"));
    }
    Ok(Parsed {
        millis: if negative { -millis } else { millis },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu() {
        assert_eq!(Quantity::from("500m").cpu_millis().unwrap(), 500);
        assert_eq!(Quantity::from("2").cpu_millis().unwrap(), 2000);
        assert_eq!(Quantity::from("0.1").cpu_millis().unwrap(), 100);
        assert_eq!(Quantity::from("1.5").cpu_millis().unwrap(), 1500);
        assert_eq!(Quantity::from("100u").cpu_millis().unwrap(), 1);
    }

    #[test]
    fn memory() {
        assert_eq!(Quantity::from("128Mi").bytes().unwrap(), 128 << 20);
        assert_eq!(Quantity::from("1G").bytes().unwrap(), 1_000_000_000);
        assert_eq!(Quantity::from("1.5Gi").bytes().unwrap(), 3 << 29);
        assert_eq!(Quantity::from("1e3").bytes().unwrap(), 1000);
        assert_eq!(Quantity::from("64k").bytes().unwrap(), 64_000);
    }

    #[test]
    fn invalid() {
        for s in ["", "Mi", "12XB", "1.2.3", "--1", "1Mii", "abc"] {
            assert!(Quantity::from(s).parse().is_err(), "{s} should be invalid");
        }
    }

    #[test]
    fn round_trip_render() {
        assert_eq!(Quantity::from_bytes(256 << 20).0, "256Mi");
        assert_eq!(Quantity::from_millis_cpu(2000).0, "2");
        assert_eq!(Quantity::from_millis_cpu(250).0, "250m");
    }
}
