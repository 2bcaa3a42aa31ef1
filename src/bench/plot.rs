//! The bench plot: tokens/s faceted so a multi-parameter sweep stays readable.
//!
//! One row of panels per test kind (prompt processing, decode), one column per swept parameter
//! (batch, threads, prompt, gen: those given more than one value). A panel puts its parameter on
//! the x axis, at the values the sweep used (evenly spaced, labelled with the values), and draws
//! one line per combination of the other swept parameters, labelled with only those (a parameter
//! the kind does not depend on, gen for prompt processing, is averaged over). The y axis runs
//! from 0 to the panel's largest mean. Nothing swept: one panel per test kind.

use super::{mean_sd, PointResult};
use std::collections::BTreeMap;

/// A sweep parameter: its name, short label prefix, and how to read it off a point.
struct Param {
    name: &'static str,
    short: &'static str,
    get: fn(&PointResult) -> usize,
}

const PARAMS: [Param; 4] = [
    Param {
        name: "batch",
        short: "b",
        get: |r| r.point.batch,
    },
    Param {
        name: "threads",
        short: "t",
        get: |r| r.point.threads,
    },
    Param {
        name: "prompt",
        short: "pp",
        get: |r| r.point.prompt,
    },
    Param {
        name: "gen",
        short: "tg",
        get: |r| r.point.gen,
    },
];

/// A test kind: its title, its tokens/s per sample, and whether a result has it.
type Kind = (
    &'static str,
    fn(&PointResult) -> Vec<f64>,
    fn(&PointResult) -> bool,
);

/// One panel: its title, x axis name and tick values, and its lines (label → (x index, y)).
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x_name: &'static str,
    pub x_values: Vec<usize>,
    pub lines: BTreeMap<String, Vec<(usize, f64)>>,
}

fn distinct(results: &[PointResult], get: fn(&PointResult) -> usize) -> Vec<usize> {
    let mut v: Vec<usize> = results.iter().map(get).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The panels for `results`, in drawing order (row-major).
pub fn panels(results: &[PointResult]) -> Vec<Panel> {
    let swept: Vec<&Param> = PARAMS
        .iter()
        .filter(|p| distinct(results, p.get).len() > 1)
        .collect();
    let kinds: [Kind; 2] = [
        (
            "prompt processing (pp) tokens/s",
            PointResult::pp_tokens_per_s,
            |r| r.point.prompt > 0,
        ),
        ("decode (tg) tokens/s", PointResult::tg_tokens_per_s, |r| {
            r.point.gen > 0
        }),
    ];
    let mut out = Vec::new();
    for (kind, tps, has) in kinds {
        let rs: Vec<&PointResult> = results.iter().filter(|r| has(r)).collect();
        if rs.is_empty() {
            continue;
        }
        // A parameter that only sizes the other kind (gen for pp) is not a facet of this one.
        let facets: Vec<&Param> = swept
            .iter()
            .copied()
            .filter(|p| !(kind.starts_with("prompt") && p.name == "gen"))
            .collect();
        if facets.is_empty() {
            let mut lines = BTreeMap::new();
            let y = rs.iter().map(|r| mean_sd(&tps(r)).0).collect::<Vec<_>>();
            lines.insert("all".to_string(), y.into_iter().map(|y| (0, y)).collect());
            out.push(Panel {
                title: kind.to_string(),
                x_name: "(one point)",
                x_values: vec![0],
                lines,
            });
            continue;
        }
        for x in &facets {
            let xs = distinct(results, x.get);
            // Means at one (line, x): several when a parameter this kind ignores was swept.
            let mut at: BTreeMap<(String, usize), Vec<f64>> = BTreeMap::new();
            for r in &rs {
                let label = facets
                    .iter()
                    .filter(|p| p.name != x.name)
                    .map(|p| format!("{}{}", p.short, (p.get)(r)))
                    .collect::<Vec<_>>()
                    .join(" ");
                let label = if label.is_empty() {
                    "all".into()
                } else {
                    label
                };
                let xi = xs.iter().position(|&v| v == (x.get)(r)).unwrap_or(0);
                at.entry((label, xi)).or_default().push(mean_sd(&tps(r)).0);
            }
            let mut lines: BTreeMap<String, Vec<(usize, f64)>> = BTreeMap::new();
            for ((label, xi), ys) in at {
                lines.entry(label).or_default().push((xi, mean_sd(&ys).0));
            }
            out.push(Panel {
                title: format!("{kind} by {}", x.name),
                x_name: x.name,
                x_values: xs,
                lines,
            });
        }
    }
    out
}

/// Draws the panels into an SVG file.
pub fn plot(path: &std::path::Path, results: &[PointResult]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let panels = panels(results);
    if panels.is_empty() {
        anyhow::bail!("nothing to plot: no results");
    }
    let rows = if panels.iter().any(|p| p.title.starts_with("decode"))
        && panels.iter().any(|p| p.title.starts_with("prompt"))
    {
        2
    } else {
        1
    };
    let cols = panels.len().div_ceil(rows);
    let (w, h) = (460 * cols as u32, 380 * rows as u32);
    let root = SVGBackend::new(path, (w.max(480), h)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, cols));
    // Panels of one kind fill a row; a kind with fewer panels leaves the rest blank.
    let pp = panels
        .iter()
        .filter(|p| p.title.starts_with("prompt"))
        .count();
    let slots: Vec<usize> = panels
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if rows == 2 && p.title.starts_with("decode") {
                cols + (i - pp)
            } else {
                i
            }
        })
        .collect();
    for (panel, slot) in panels.iter().zip(slots) {
        let Some(area) = areas.get(slot) else {
            continue;
        };
        let ymax = panel
            .lines
            .values()
            .flatten()
            .map(|p| p.1)
            .fold(0.0, f64::max)
            .max(1e-9);
        let n = panel.x_values.len();
        let xs = panel.x_values.clone();
        // A category axis: one segment per swept value, labelled with the value.
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n as i32).into_segmented(), 0f64..ymax * 1.1)?;
        chart
            .configure_mesh()
            .x_desc(panel.x_name)
            .y_desc("tokens/s")
            .x_labels(n)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => usize::try_from(*i)
                    .ok()
                    .and_then(|i| xs.get(i))
                    .map_or(String::new(), |v| v.to_string()),
                _ => String::new(),
            })
            .draw()?;
        for (i, (label, pts)) in panel.lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(SegmentValue<i32>, f64)> = pts
                .iter()
                .map(|&(x, y)| (SegmentValue::CenterOf(x as i32), y))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::{BenchPoint, Sample};
    use crate::util::memory::MemoryReport;

    /// Tokens/s a synthetic point is made to have, decode and prefill: distinct per point so a
    /// misplaced value shows.
    pub fn speeds(p: &BenchPoint) -> (f64, f64) {
        let tg = 100.0 * p.batch as f64 + 10.0 * p.threads as f64 + p.prompt as f64 / 64.0;
        (tg, 7.0 * tg)
    }

    pub fn synthetic(p: BenchPoint) -> PointResult {
        let (tg, pp) = speeds(&p);
        let sample = Sample {
            prefill_s: (p.batch * p.prompt) as f64 / pp,
            decode_s: (p.batch * p.gen) as f64 / tg,
            step_s: vec![1e-3; p.gen],
            expert_tokens: 0,
            decode_weight_bytes: 0,
            decode_kv_bytes: 0,
        };
        PointResult {
            point: p,
            backend: "cpu".into(),
            samples: vec![sample.clone(), sample],
            peak_rss_bytes: None,
            kv_cache_bytes: 0,
            memory: MemoryReport::default(),
        }
    }

    /// batch {1, 8} × threads {1, 2} × prompt {64, 512}, gen 32.
    pub fn sweep() -> Vec<PointResult> {
        let mut out = Vec::new();
        for threads in [1, 2] {
            for batch in [1, 8] {
                for prompt in [64, 512] {
                    out.push(synthetic(BenchPoint {
                        threads,
                        batch,
                        prompt,
                        gen: 32,
                    }));
                }
            }
        }
        out
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn a_three_parameter_sweep_gets_a_panel_per_kind_and_parameter() {
        let results = sweep();
        let panels = panels(&results);
        let titles: Vec<&str> = panels.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "prompt processing (pp) tokens/s by batch",
                "prompt processing (pp) tokens/s by threads",
                "prompt processing (pp) tokens/s by prompt",
                "decode (tg) tokens/s by batch",
                "decode (tg) tokens/s by threads",
                "decode (tg) tokens/s by prompt",
            ]
        );
        let by_batch = &panels[3];
        assert_eq!(by_batch.x_values, [1, 8]);
        let labels: Vec<&str> = by_batch.lines.keys().map(String::as_str).collect();
        assert_eq!(labels, ["t1 pp512", "t1 pp64", "t2 pp512", "t2 pp64"]);
        // Every point sits where its own parameters say, at its own speed.
        for panel in &panels {
            let decode = panel.title.starts_with("decode");
            for (label, pts) in &panel.lines {
                assert_eq!(pts.len(), panel.x_values.len(), "{}: {label}", panel.title);
                for &(xi, y) in pts {
                    let want = results
                        .iter()
                        .filter(|r| {
                            let x = PARAMS.iter().find(|p| p.name == panel.x_name).unwrap();
                            (x.get)(r) == panel.x_values[xi]
                                && label.split(' ').all(|part| {
                                    PARAMS.iter().any(|p| {
                                        part.strip_prefix(p.short)
                                            .and_then(|v| v.parse::<usize>().ok())
                                            == Some((p.get)(r))
                                    })
                                })
                        })
                        .map(|r| {
                            let (tg, pp) = speeds(&r.point);
                            if decode {
                                tg
                            } else {
                                pp
                            }
                        })
                        .collect::<Vec<_>>();
                    assert_eq!(want.len(), 1, "{}: {label} at {xi}", panel.title);
                    assert!(
                        close(y, want[0]),
                        "{}: {label}: {y} vs {}",
                        panel.title,
                        want[0]
                    );
                }
            }
        }
    }

    #[test]
    fn the_svg_has_every_panel_legend_and_swept_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        plot(&path, &sweep()).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        if let Some(keep) = std::env::var_os("BENCH_PLOT_KEEP") {
            std::fs::write(keep, &svg).unwrap();
        }
        for want in [
            "decode (tg) tokens/s by prompt",
            "prompt processing (pp) tokens/s by threads",
            "t2 pp512",
            "b8 t1",
            "\n512\n",
            "\n64\n",
            "\n8\n",
        ] {
            assert!(svg.contains(want), "the plot lacks {want:?}");
        }
    }

    #[test]
    fn nothing_swept_gives_one_panel_per_kind() {
        let one = vec![synthetic(BenchPoint {
            threads: 2,
            batch: 1,
            prompt: 64,
            gen: 16,
        })];
        let ps = panels(&one);
        assert_eq!(ps.len(), 2);
        assert!(close(ps[1].lines["all"][0].1, speeds(&one[0].point).0));
        let dir = tempfile::tempdir().unwrap();
        plot(&dir.path().join("one.svg"), &one).unwrap();
        // Only gen swept: prompt processing does not depend on it, so it is averaged.
        let gens: Vec<_> = [16, 64]
            .into_iter()
            .map(|gen| {
                synthetic(BenchPoint {
                    threads: 2,
                    batch: 1,
                    prompt: 64,
                    gen,
                })
            })
            .collect();
        let ps = panels(&gens);
        assert_eq!(ps[0].title, "prompt processing (pp) tokens/s");
        assert_eq!(ps[1].title, "decode (tg) tokens/s by gen");
    }
}
