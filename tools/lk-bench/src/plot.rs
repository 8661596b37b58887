//! SVG figures beside the markdown report (plotters, SVG backend): the latency
//! distributions of grants and handoffs, leasekeeper's and client-go's on one log-scale
//! chart, and the scale run's settle and drain curves.

use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

/// One latency distribution: a label and its samples.
pub struct Cdf {
    pub label: String,
    pub samples: Vec<Duration>,
}

/// One point of the scale run: seconds since the first create, claims the harness has
/// seen created, claims the operator has arbitrated (Granted or Pending), claims released.
#[derive(Clone, Copy, Debug)]
pub struct ScalePoint {
    pub t: f64,
    pub created: usize,
    pub arbitrated: usize,
    pub released: usize,
}

const W: u32 = 900;
const H: u32 = 520;

fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 6] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0x17, 0xbe, 0xcf),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
    ];
    C[i % C.len()]
}

/// The empirical CDF of `samples` in milliseconds: (ms, fraction at or below).
pub fn cdf_points(samples: &[Duration]) -> Vec<(f64, f64)> {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len() as f64;
    ms.iter()
        .enumerate()
        .map(|(i, v)| (*v, (i + 1) as f64 / n))
        .collect()
}

/// Writes the latency CDFs to `path` (log-scale milliseconds).
pub fn latency_cdf(path: &Path, title: &str, series: &[Cdf]) -> Result<(), String> {
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.samples.iter().map(|d| d.as_secs_f64() * 1e3))
        .filter(|v| *v > 0.0)
        .collect();
    if all.is_empty() {
        return Err("no samples".into());
    }
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min) * 0.8;
    let hi = all.iter().copied().fold(0.0, f64::max) * 1.25;
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("fraction of samples at or below")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in series.iter().enumerate() {
        let color = palette(i);
        let label = format!("{} (n={})", s.label, s.samples.len());
        chart
            .draw_series(LineSeries::new(
                steps(&cdf_points(&s.samples)),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    legend(&mut chart)?;
    root.present().map_err(|e| e.to_string())
}

/// The legend box, lower right.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())
}

/// A staircase through CDF points, so the line shows the empirical distribution.
fn steps(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2);
    let mut last = 0.0;
    for (x, y) in points {
        out.push((*x, last));
        out.push((*x, *y));
        last = *y;
    }
    out
}

/// Writes the scale run's curves to `path`: claims created, arbitrated and released
/// against seconds since the first create.
pub fn settle_curve(
    path: &Path,
    title: &str,
    points: &[ScalePoint],
    total: usize,
    settled_at: f64,
) -> Result<(), String> {
    let t_max = points.last().map_or(1.0, |p| p.t).max(1.0);
    let root = SVGBackend::new(path, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..t_max, 0.0..(total as f64 * 1.05))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first claim was created")
        .y_desc("claims")
        .draw()
        .map_err(|e| e.to_string())?;
    type Pick = fn(&ScalePoint) -> usize;
    let lines: [(&str, Pick); 3] = [
        ("created (seen by the harness's watch)", |p| p.created),
        ("Granted or Pending now", |p| p.arbitrated),
        ("released (drain: each holder releases once Granted)", |p| {
            p.released
        }),
    ];
    for (i, (label, pick)) in lines.into_iter().enumerate() {
        let color = palette(i);
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.t, pick(p) as f64)),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    let top = total as f64 * 1.05;
    chart
        .draw_series(LineSeries::new(
            [(settled_at, 0.0), (settled_at, top)],
            BLACK.mix(0.6).stroke_width(1),
        ))
        .map_err(|e| e.to_string())?
        .label(format!(
            "settled: every claim Granted or at its place ({settled_at:.1} s)"
        ))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.6)));
    legend(&mut chart)?;
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cdf_rises_to_one_in_sample_order() {
        let s = [30, 10, 20, 40].map(Duration::from_millis);
        let p = cdf_points(&s);
        assert_eq!(p.len(), 4);
        assert_eq!(p[0], (10.0, 0.25));
        assert_eq!(p[3], (40.0, 1.0));
        assert!(p.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    }

    #[test]
    fn the_figures_are_svg_with_every_series_labelled() {
        let dir = std::env::temp_dir().join(format!("lk-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let cdf = dir.join("cdf.svg");
        let series = [
            Cdf {
                label: "leasekeeper grant".into(),
                samples: [7, 8, 15].map(Duration::from_millis).to_vec(),
            },
            Cdf {
                label: "client-go handover".into(),
                samples: [600, 700, 2800].map(Duration::from_millis).to_vec(),
            },
        ];
        latency_cdf(&cdf, "latency", &series).expect("plot");
        let svg = std::fs::read_to_string(&cdf).expect("svg");
        assert!(svg.starts_with("<svg"), "{}", &svg[..60.min(svg.len())]);
        assert!(
            svg.contains("leasekeeper grant (n=3)") && svg.contains("client-go handover (n=3)")
        );
        let curve = dir.join("curve.svg");
        let points: Vec<ScalePoint> = (0..10)
            .map(|i| ScalePoint {
                t: i as f64,
                created: 10 * i,
                arbitrated: 9 * i,
                released: i,
            })
            .collect();
        settle_curve(&curve, "scale", &points, 100, 4.5).expect("plot");
        let svg = std::fs::read_to_string(&curve).expect("svg");
        assert!(svg.contains("Granted or Pending now") && svg.contains("(4.5 s)"));
        assert!(latency_cdf(&dir.join("none.svg"), "x", &[]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
