//! Medians, spreads and ratio tables over repeated, alternated runs.

use serde::Serialize;

/// Repeated measurements of one quantity.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Samples {
    pub values: Vec<f64>,
}

impl Samples {
    pub fn push(&mut self, value: f64) {
        self.values.push(value);
    }

    /// The median (0 when empty).
    #[must_use]
    pub fn median(&self) -> f64 {
        if self.values.is_empty() {
            return 0.0;
        }
        let mut sorted = self.values.clone();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        }
    }

    /// (max - min) / median, in percent: how noisy the runs were.
    #[must_use]
    pub fn spread_percent(&self) -> f64 {
        let median = self.median();
        if median == 0.0 {
            return 0.0;
        }
        let min = self.values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (max - min) / median * 100.0
    }
}

/// Formats a number of IOPS or bytes per second compactly.
#[must_use]
pub fn compact(value: f64) -> String {
    if value >= 1e9 {
        format!("{:.2}G", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}k", value / 1e3)
    } else {
        format!("{value:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let samples = Samples {
            values: vec![3.0, 1.0, 2.0],
        };
        assert!((samples.median() - 2.0).abs() < 1e-12);
        assert!((samples.spread_percent() - 100.0).abs() < 1e-9);
        let even = Samples {
            values: vec![1.0, 2.0, 3.0, 4.0],
        };
        assert!((even.median() - 2.5).abs() < 1e-12);
        assert_eq!(Samples::default().median(), 0.0);
    }

    #[test]
    fn compact_numbers() {
        assert_eq!(compact(1234.0), "1.2k");
        assert_eq!(compact(2_500_000.0), "2.50M");
    }
}
