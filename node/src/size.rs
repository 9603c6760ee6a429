//! Byte sizes as users type them: `10GiB`, `512M`, `4096`, `1.5TiB`.
//! Binary units only (K = KiB = 1024): disks and volumes are sized in them.

use thiserror::Error;

/// A size that could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    /// empty or malformed
    #[error(
        "invalid size {input:?}: expected a number with an optional unit (K, M, G, T, KiB, MiB, GiB, TiB), e.g. 10GiB"
    )]
    Malformed { input: String },
    /// too large
    #[error("size {input:?} is too large")]
    TooLarge { input: String },
}

const UNITS: [(&str, u32); 9] = [
    ("tib", 40),
    ("gib", 30),
    ("mib", 20),
    ("kib", 10),
    ("t", 40),
    ("g", 30),
    ("m", 20),
    ("k", 10),
    ("b", 0),
];

/// Parses a size in bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let malformed = || SizeError::Malformed {
        input: input.to_owned(),
    };
    let text = input.trim().to_ascii_lowercase();
    let (number, shift) = UNITS
        .iter()
        .find_map(|(suffix, shift)| text.strip_suffix(suffix).map(|n| (n.trim(), *shift)))
        .unwrap_or((text.as_str(), 0));
    if number.is_empty() || number.starts_with('-') || number.starts_with('+') {
        return Err(malformed());
    }
    let multiplier = 1u128 << shift;
    let bytes: u128 = match number.split_once('.') {
        None => number.parse::<u128>().map_err(|_| malformed())? * multiplier,
        Some((whole, fraction)) => {
            if fraction.is_empty() || fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
                return Err(malformed());
            }
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| malformed())?
            };
            let scale = 10u128.pow(u32::try_from(fraction.len()).expect("at most 9"));
            let fraction: u128 = fraction.parse().map_err(|_| malformed())?;
            whole * multiplier + fraction * multiplier / scale
        }
    };
    u64::try_from(bytes).map_err(|_| SizeError::TooLarge {
        input: input.to_owned(),
    })
}

/// Formats bytes with the largest binary unit that keeps one decimal.
#[must_use]
pub fn format_size(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        let base = 1u64 << shift;
        if bytes >= base {
            let tenths = u128::from(bytes) * 10 / u128::from(base);
            return if tenths % 10 == 0 {
                format!("{} {unit}", tenths / 10)
            } else {
                format!("{}.{} {unit}", tenths / 10, tenths % 10)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units_are_binary_and_case_insensitive() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5TiB"), Ok(3 << 39));
        assert_eq!(parse_size(" 2 kib "), Ok(2048));
        assert_eq!(parse_size("7B"), Ok(7));
    }

    #[test]
    fn garbage_is_refused_with_an_example() {
        for bad in ["", "GiB", "-1G", "1.G", "ten", "1..5G", "1e9", "0x10"] {
            let error = parse_size(bad).unwrap_err();
            assert!(error.to_string().contains("10GiB"), "{bad}: {error}");
        }
        assert!(matches!(parse_size("99999999999T"), Err(SizeError::TooLarge { .. })));
    }

    #[test]
    fn formatting_picks_a_readable_unit() {
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }

    proptest! {
        #[test]
        fn formatted_whole_units_parse_back(value in 1u64..1024, shift in prop::sample::select(vec![10u32, 20, 30, 40])) {
            let bytes = value << shift;
            prop_assert_eq!(parse_size(&format_size(bytes).replace(' ', "")), Ok(bytes));
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,20}") {
            let _ = parse_size(&text);
        }
    }
}
