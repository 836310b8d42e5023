//! Error measures.

/// Sum of squares, accumulated in f64.
pub fn energy(x: &[f32]) -> f64 {
    x.iter().map(|v| (*v as f64) * (*v as f64)).sum()
}

/// Sum of squared differences, accumulated in f64.
pub fn squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = *x as f64 - *y as f64;
            d * d
        })
        .sum()
}

/// Signal-to-quantization-noise ratio in dB of `approx` against `reference`;
/// `None` when they are equal (infinite SQNR).
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> Option<f64> {
    let e = squared_error(reference, approx);
    sqnr_from(energy(reference), e)
}

/// SQNR in dB from a signal energy and an error energy.
pub fn sqnr_from(signal: f64, error: f64) -> Option<f64> {
    if error <= 0.0 {
        None
    } else if signal <= 0.0 {
        Some(f64::NEG_INFINITY)
    } else {
        Some(10.0 * (signal / error).log10())
    }
}
