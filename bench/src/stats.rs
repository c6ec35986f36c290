//! Latency histograms: recorded in microseconds, reported in milliseconds.

use std::time::Duration;

use hdrhistogram::Histogram;

/// An auto-resizing histogram with three significant digits: it never refuses a sample, and
/// only grows as far as the slowest sample needs.
pub fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is a valid histogram precision")
}

pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    // `record` grows an auto-resizing histogram (`saturating_record` would clamp instead); it
    // can only fail beyond the histogram's absolute limit, where clamping is all there is.
    if histogram.record(micros).is_err() {
        histogram.saturating_record(micros);
    }
}

/// p50, p99 and max in milliseconds; zeros for an empty histogram.
pub fn summary_ms(histogram: &Histogram<u64>) -> (f64, f64, f64) {
    if histogram.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    (
        ms(histogram.value_at_quantile(0.50)),
        ms(histogram.value_at_quantile(0.99)),
        ms(histogram.max()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_in_milliseconds() {
        let mut h = histogram();
        for i in 1..=100 {
            record(&mut h, Duration::from_millis(i));
        }
        let (p50, p99, max) = summary_ms(&h);
        assert!((p50 - 50.0).abs() < 0.1, "p50 {p50}");
        assert!((p99 - 99.0).abs() < 0.1, "p99 {p99}");
        assert!((max - 100.0).abs() < 0.1, "max {max}");
        assert_eq!(summary_ms(&histogram()), (0.0, 0.0, 0.0));
    }
}
