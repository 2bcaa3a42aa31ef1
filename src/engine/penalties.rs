//! Repetition penalties applied to the logits before sampling: OpenAI's presence and frequency
//! penalties (over the completion's tokens: `l -= frequency·count + presence·[count > 0]`) and
//! the multiplicative repetition penalty of transformers and vLLM (over prompt and completion:
//! a positive logit divided by it, a negative one multiplied).

use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalties {
    pub presence: f32,
    pub frequency: f32,
    /// 1 is off.
    pub repetition: f32,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties {
            presence: 0.0,
            frequency: 0.0,
            repetition: 1.0,
        }
    }
}

impl Penalties {
    pub fn is_off(&self) -> bool {
        *self == Penalties::default()
    }

    /// Checks the ranges OpenAI (±2) and transformers (> 0) accept; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("presence_penalty", self.presence),
            ("frequency_penalty", self.frequency),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("`{name}` must be in [-2, 2], got {v}"));
            }
        }
        if !(self.repetition > 0.0 && self.repetition.is_finite()) {
            return Err(format!(
                "`repetition_penalty` must be a positive number, got {}",
                self.repetition
            ));
        }
        Ok(())
    }
}

/// The token counts the penalties need, kept as the generation goes.
pub struct PenaltyState {
    penalties: Penalties,
    /// Completion tokens and how often each came.
    counts: HashMap<u32, u32>,
    /// Every token of prompt and completion (the repetition penalty's set).
    seen: HashSet<u32>,
}

impl PenaltyState {
    pub fn new(penalties: Penalties, prompt: &[u32]) -> PenaltyState {
        PenaltyState {
            penalties,
            counts: HashMap::new(),
            seen: prompt.iter().copied().collect(),
        }
    }

    pub fn push(&mut self, token: u32) {
        *self.counts.entry(token).or_default() += 1;
        self.seen.insert(token);
    }

    /// `logits` with the penalties applied.
    pub fn apply(&self, logits: &[f32]) -> Vec<f32> {
        let mut out = logits.to_vec();
        let p = &self.penalties;
        if p.repetition != 1.0 {
            for &t in &self.seen {
                if let Some(l) = out.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition
                    } else {
                        *l * p.repetition
                    };
                }
            }
        }
        for (&t, &n) in &self.counts {
            if let Some(l) = out.get_mut(t as usize) {
                *l -= p.frequency * n as f32 + p.presence;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalties_follow_openai_and_transformers() {
        let p = Penalties {
            presence: 0.5,
            frequency: 0.25,
            repetition: 2.0,
        };
        let mut s = PenaltyState::new(p, &[0]);
        s.push(1);
        s.push(1);
        s.push(2);
        let out = s.apply(&[4.0, 3.0, -1.0, 5.0]);
        // Token 0: prompt only, repetition: 4 / 2. Token 1: twice generated: 3/2 - 0.5 - 0.5.
        // Token 2: once, negative: -1·2 - 0.25 - 0.5. Token 3: untouched.
        assert_eq!(out, vec![2.0, 0.5, -2.75, 5.0]);
        assert!(Penalties::default().is_off());
        assert!(p.validate().is_ok());
        let bad = Penalties {
            presence: 3.0,
            ..Penalties::default()
        };
        assert!(bad.validate().unwrap_err().contains("`presence_penalty`"));
        let bad = Penalties {
            repetition: 0.0,
            ..Penalties::default()
        };
        assert!(bad.validate().unwrap_err().contains("`repetition_penalty`"));
    }
}
