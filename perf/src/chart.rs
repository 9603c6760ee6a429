//! PNG charts of a benchmark's ratios (plotters): one bar per measure, its
//! length the ratio of ballast to the baseline measured in the same run,
//! with a line at 1.0 and, where the issue sets one, the target marked.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Where Debian's fonts-dejavu-core puts its sans-serif font (installed by
/// ci/install-deps.sh); BALLAST_PERF_FONT names another TTF.
const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One bar: a measure, its ratio, and the target ratio if there is one.
pub struct Bar {
    pub label: String,
    pub ratio: f64,
    pub target: Option<f64>,
}

fn font() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = std::env::var("BALLAST_PERF_FONT").unwrap_or_else(|_| DEFAULT_FONT.to_owned());
            let bytes = std::fs::read(&path)
                .map_err(|error| format!("chart font {path}: {error} (apt-get install fonts-dejavu-core)"))?;
            register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                .map_err(|_| format!("chart font {path} is not a usable TTF"))
        })
        .clone()
        .map_err(|error| anyhow!(error))
}

/// Draws `bars` as a horizontal ratio chart into `path` (PNG).
pub fn ratio_chart(path: &Path, title: &str, bars: &[Bar]) -> Result<()> {
    font()?;
    let rows = bars.len().max(1);
    let height = 110 + 56 * u32::try_from(rows).unwrap_or(u32::MAX / 64);
    let root = BitMapBackend::new(path, (960, height)).into_drawing_area();
    let draw = |error: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {error}", path.display());
    root.fill(&WHITE).map_err(draw)?;
    let widest = bars
        .iter()
        .flat_map(|bar| [bar.ratio, bar.target.unwrap_or(0.0)])
        .fold(1.0, f64::max);
    let x_max = (widest * 1.25).max(1.5);
    let y_max = rows as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(8)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(draw)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_desc("ratio to the baseline measured in the same run")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(draw)?;
    for (index, bar) in bars.iter().enumerate() {
        // Top row first.
        let y = y_max - index as f64 - 1.0;
        let met = bar.target.is_none_or(|target| bar.ratio >= target);
        let color = if met {
            RGBColor(70, 130, 180)
        } else {
            RGBColor(205, 92, 92)
        };
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y + 0.12), (bar.ratio.max(0.0), y + 0.52)],
                color.filled(),
            )))
            .map_err(draw)?;
        let target = bar
            .target
            .map_or_else(String::new, |target| format!("  (target {target:.1}x)"));
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{}: {:.2}x{target}", bar.label, bar.ratio),
                (0.02, y + 0.92),
                ("sans-serif", 15),
            )))
            .map_err(draw)?;
        if let Some(target) = bar.target {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(target, y + 0.05), (target, y + 0.6)],
                    BLACK.stroke_width(2),
                )))
                .map_err(draw)?;
        }
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, 0.0), (1.0, y_max)],
            BLACK.mix(0.4).stroke_width(1),
        )))
        .map_err(draw)?;
    root.present()
        .map_err(draw)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_of_many_bars_with_and_without_targets_is_a_png() {
        if std::env::var_os("BALLAST_PERF_FONT").is_none() && !Path::new(DEFAULT_FONT).exists() {
            println!("SKIP: chart: {DEFAULT_FONT} missing (ci/install-deps.sh installs fonts-dejavu-core)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let bars: Vec<Bar> = (0..12)
            .map(|i| Bar {
                label: format!("measure {i}"),
                ratio: f64::from(i) * 0.3,
                target: (i % 3 == 0).then_some(1.0),
            })
            .collect();
        ratio_chart(&path, "test", &bars).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        ratio_chart(&dir.path().join("empty.png"), "no bars", &[]).unwrap();
    }
}
