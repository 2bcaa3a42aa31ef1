//! The expert heat map: one cell per (MoE layer, expert), its heat (how often the router chose
//! it) and the tier it lives in (GPU, RAM, storage). `serve --http`'s stats endpoint sends it as
//! JSON, heat and palette included, so the dashboard's script only lays cells out; `profile
//! --svg` draws it here. One colour and heat rule for both.

use crate::model::weights::Ffn;
use crate::model::Model;
use std::fmt::Write;

/// Where an expert's weights are now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// In a slot of the engine's device expert tier (`Engine::with_tier`).
    Gpu,
    /// In memory: used in place (no `--mem`), or in a cache slot.
    Ram,
    /// Only in the .emoe file (read into a slot when needed).
    Storage,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::Ram, Tier::Storage];

    /// The tier's hue; a cell's opacity carries its heat.
    pub fn colour(self) -> &'static str {
        match self {
            Tier::Gpu => "#8e44ad",
            Tier::Ram => "#1f7ae0",
            Tier::Storage => "#e0701f",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Ram => "ram",
            Tier::Storage => "storage",
        }
    }
}

/// The palette as JSON (`{"gpu": "#…", …}`), for the dashboard.
pub fn palette() -> serde_json::Value {
    Tier::ALL
        .iter()
        .map(|t| (t.name().to_string(), serde_json::Value::from(t.colour())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The least opacity of a cell, so a cold expert's tier still shows.
pub const MIN_OPACITY: f64 = 0.12;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HeatMap {
    /// The model layer of each row (the MoE layers, in order).
    pub layers: Vec<usize>,
    pub experts: usize,
    /// Tokens routed to each expert, per row.
    pub counts: Vec<Vec<u64>>,
    /// Where each expert lives, per row.
    pub tiers: Vec<Vec<Tier>>,
    /// Each cell's heat in [0, 1] (see [`HeatMap::heat`]).
    pub heat: Vec<Vec<f64>>,
}

/// The layers of `model` that route to experts.
pub fn moe_layers(model: &Model) -> Vec<usize> {
    model
        .weights
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l.ffn, Ffn::Moe(_)))
        .map(|(i, _)| i)
        .collect()
}

impl HeatMap {
    /// The rows `layers` of `counts` (indexed by model layer), with each cell's tier from
    /// `tier(layer, expert)`. Missing counts read as zero.
    pub fn new(
        layers: Vec<usize>,
        experts: usize,
        counts: &[Vec<u64>],
        tier: impl Fn(usize, usize) -> Tier,
    ) -> HeatMap {
        let counts: Vec<Vec<u64>> = layers
            .iter()
            .map(|&l| {
                (0..experts)
                    .map(|e| counts.get(l).and_then(|r| r.get(e)).copied().unwrap_or(0))
                    .collect()
            })
            .collect();
        let tiers = layers
            .iter()
            .map(|&l| (0..experts).map(|e| tier(l, e)).collect())
            .collect();
        let max = counts.iter().flatten().copied().max().unwrap_or(0);
        let heat = counts
            .iter()
            .map(|r| r.iter().map(|&c| HeatMap::heat(c, max)).collect())
            .collect();
        HeatMap {
            layers,
            experts,
            counts,
            tiers,
            heat,
        }
    }

    /// `count`'s heat next to the hottest cell's `max`: log-scaled, so that one very hot
    /// expert does not wash the others out; 0 when nothing has been routed yet.
    pub fn heat(count: u64, max: u64) -> f64 {
        if max == 0 {
            return 0.0;
        }
        ((1 + count) as f64).ln() / ((1 + max) as f64).ln()
    }

    /// A cell's fill opacity for heat `h`.
    pub fn opacity(h: f64) -> f64 {
        MIN_OPACITY + (1.0 - MIN_OPACITY) * h.clamp(0.0, 1.0)
    }

    /// The map as a standalone SVG document: a row per layer, a column per expert, a legend of
    /// the tiers that occur; each cell's `<title>` gives its layer, expert, count and tier.
    pub fn to_svg(&self, title: &str) -> String {
        const CELL: usize = 26;
        const GAP: usize = 2;
        const LEFT: usize = 64;
        const TOP: usize = 54;
        let (rows, cols) = (self.layers.len(), self.experts);
        let tiers_shown = Tier::ALL
            .iter()
            .filter(|&&t| self.tiers.iter().flatten().any(|&c| c == t))
            .count();
        // Wide enough for the grid, the title (about 7 px a character) and the legend.
        let width = (LEFT + cols * (CELL + GAP) + 16)
            .max(16 + 7 * title.chars().count())
            .max(8 + 80 * tiers_shown + 220);
        let legend_y = TOP + rows * (CELL + GAP) + 18;
        let height = legend_y + 24;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(
            s,
            r##"<rect width="{width}" height="{height}" fill="#ffffff"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="8" y="16" font-size="13" font-weight="bold">{}</text>"#,
            escape(title)
        );
        let _ = writeln!(s, r#"<text x="{LEFT}" y="{}">expert →</text>"#, TOP - 24);
        for e in 0..cols {
            let x = LEFT + e * (CELL + GAP) + CELL / 2;
            let _ = writeln!(
                s,
                r#"<text x="{x}" y="{}" text-anchor="middle">{e}</text>"#,
                TOP - 6
            );
        }
        for (r, &layer) in self.layers.iter().enumerate() {
            let y = TOP + r * (CELL + GAP);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">layer {layer}</text>"#,
                LEFT - 6,
                y + CELL / 2 + 4
            );
            for e in 0..cols {
                let (count, tier, heat) = (self.counts[r][e], self.tiers[r][e], self.heat[r][e]);
                let _ = writeln!(
                    s,
                    r#"<rect class="cell" data-layer="{layer}" data-expert="{e}" data-count="{count}" data-tier="{}" x="{}" y="{y}" width="{CELL}" height="{CELL}" fill="{}" fill-opacity="{:.3}"><title>layer {layer}, expert {e}: {count} tokens, {}</title></rect>"#,
                    tier.name(),
                    LEFT + e * (CELL + GAP),
                    tier.colour(),
                    HeatMap::opacity(heat),
                    tier.name()
                );
            }
        }
        let mut x = 8;
        for t in Tier::ALL {
            if !self.tiers.iter().flatten().any(|&c| c == t) {
                continue;
            }
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                legend_y - 10,
                t.colour(),
                x + 16,
                legend_y,
                t.name()
            );
            x += 80;
        }
        let _ = writeln!(
            s,
            r#"<text x="{x}" y="{legend_y}">opacity: tokens routed (log scale)</text>"#
        );
        s.push_str("</svg>\n");
        s
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_is_log_scaled_and_zero_without_counts() {
        assert_eq!(HeatMap::heat(5, 0), 0.0);
        assert_eq!(HeatMap::heat(0, 100), 0.0);
        assert!((HeatMap::heat(100, 100) - 1.0).abs() < 1e-12);
        let (a, b) = (HeatMap::heat(9, 99), HeatMap::heat(10, 99));
        assert!(a < b && (a - 0.5).abs() < 1e-12);
    }

    #[test]
    fn rows_are_the_given_layers_and_missing_counts_are_zero() {
        let counts = vec![vec![1, 2], vec![], vec![3, 4]];
        let m = HeatMap::new(vec![0, 2], 2, &counts, |l, _| {
            if l == 0 {
                Tier::Ram
            } else {
                Tier::Storage
            }
        });
        assert_eq!(m.counts, vec![vec![1, 2], vec![3, 4]]);
        assert_eq!(m.tiers[1], vec![Tier::Storage; 2]);
        assert!((m.heat[1][1] - 1.0).abs() < 1e-12);
        let short = HeatMap::new(vec![1], 2, &counts, |_, _| Tier::Ram);
        assert_eq!(short.counts, vec![vec![0, 0]]);
    }

    #[test]
    fn svg_escapes_the_title() {
        let m = HeatMap::new(vec![0], 1, &[vec![1]], |_, _| Tier::Ram);
        let svg = m.to_svg("a <b> & \"c\"");
        assert!(svg.contains("a &lt;b&gt; &amp; &quot;c&quot;"));
        assert!(!svg.contains("<b>"));
    }
}
