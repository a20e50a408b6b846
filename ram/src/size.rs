//! QEMU-style size strings: `512M`, `2G`, `64k`, `1.5G`, plain numbers.

use thiserror::Error;

/// Why a size string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    /// Empty string or no digits.
    #[error("'{0}' is not a size (expected a number with an optional K, M, G or T suffix)")]
    NotASize(String),
    /// Unknown suffix.
    #[error("'{0}' has an unknown size suffix (use K, M, G, T or B)")]
    BadSuffix(String),
    /// Does not fit in 64 bits.
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// Parses a size whose bare numbers are bytes (QEMU's `qemu_strtosz`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    parse_size_default_unit(text, 1)
}

/// Parses a size, scaling bare numbers by `default_unit` (QEMU's `-m` uses MiB).
pub fn parse_size_default_unit(text: &str, default_unit: u64) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.matches('.').count() > 1 {
        return Err(SizeError::NotASize(text.to_string()));
    }
    let unit: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" => default_unit,
        "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(SizeError::BadSuffix(text.to_string())),
    };
    if let Some((int, frac)) = num.split_once('.') {
        // Fractions are allowed with a unit, as in QEMU ("1.5G").
        let int: u64 = int
            .parse()
            .map_err(|_| SizeError::TooLarge(text.to_string()))?;
        let frac_val: f64 = format!("0.{frac}")
            .parse()
            .map_err(|_| SizeError::NotASize(text.to_string()))?;
        let whole = int
            .checked_mul(unit)
            .ok_or_else(|| SizeError::TooLarge(text.to_string()))?;
        let part = (frac_val * unit as f64) as u64;
        return whole
            .checked_add(part)
            .ok_or_else(|| SizeError::TooLarge(text.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::TooLarge(text.to_string()))?;
    n.checked_mul(unit)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size_default_unit("512", 1 << 20), Ok(512 << 20));
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(parse_size(""), Err(SizeError::NotASize(_))));
        assert!(matches!(parse_size("M"), Err(SizeError::NotASize(_))));
        assert!(matches!(parse_size("12Q"), Err(SizeError::BadSuffix(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(parse_size("1.2.3G"), Err(SizeError::NotASize(_))));
    }
}
