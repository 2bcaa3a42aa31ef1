//! A completion as an iterator: each item is the text one step made final, so a caller can print
//! as it goes and stop by dropping the iterator. The same state machine as
//! [`generate`](super::generation::generate) (eos, stop strings, the token limit).

#![warn(missing_docs)]

use super::generation::{FinishReason, GenerateOutput, GenerateRequest, Generation};
use super::Engine;
use crate::error::Result;

/// The pieces of one completion, in order; made by [`Engine::stream`].
///
/// Items are the text that became final at each step (one or more tokens' worth; steps whose
/// text is not final yet, such as half of a UTF-8 character or a possible stop string, yield
/// nothing). After an error the stream ends.
pub struct TokenStream<'e> {
    engine: &'e Engine,
    generation: Generation,
}

impl Engine {
    /// Starts `req` (tokenizes the prompt, sets up a KV cache); the returned iterator runs one
    /// forward step per [`Iterator::next`] until the completion ends.
    ///
    /// ```no_run
    /// use edgemoe::{EngineBuilder, GenerateRequest, SamplingParams};
    /// let engine = EngineBuilder::new(std::sync::Arc::new(edgemoe::load_model(None)?)).build()?;
    /// let req = GenerateRequest {
    ///     prompt: "And God said".into(),
    ///     max_tokens: 30,
    ///     sampling: SamplingParams::default(),
    ///     stop: vec![],
    /// };
    /// for piece in engine.stream(&req)? {
    ///     print!("{}", piece?);
    /// }
    /// # Ok::<(), edgemoe::Error>(())
    /// ```
    pub fn stream(&self, req: &GenerateRequest) -> Result<TokenStream<'_>> {
        Ok(TokenStream {
            engine: self,
            generation: Generation::new(self, req)?,
        })
    }
}

impl TokenStream<'_> {
    /// Why the completion ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.generation.finished()
    }

    /// The completion so far: text, token counts, timings, finish reason.
    pub fn output(&self) -> GenerateOutput {
        self.generation.output()
    }
}

impl Iterator for TokenStream<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        while self.generation.finished().is_none() {
            let step = self
                .engine
                .forward(&mut [self.generation.batch_item()])
                .and_then(|logits| {
                    let tokenizer = &self.engine.model().tokenizer;
                    self.generation.accept(&logits[0], tokenizer)
                });
            match step {
                Ok(piece) if piece.is_empty() => continue,
                Ok(piece) => return Some(Ok(piece)),
                Err(e) => {
                    // Fused: the error is the last item.
                    self.generation.fail_with(e.to_string());
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::generation::generate;
    use crate::engine::sampling::SamplingParams;
    use std::sync::Arc;

    /// The stream's pieces are what `generate` prints, and its output the same completion.
    #[test]
    fn stream_yields_what_generate_prints() {
        let engine = Engine::new(Arc::new(crate::Model::builtin_default()), 1).unwrap();
        let req = GenerateRequest {
            prompt: "Once upon".into(),
            max_tokens: 12,
            sampling: SamplingParams {
                temperature: 0.8,
                seed: 7,
                ..SamplingParams::default()
            },
            stop: vec![],
        };
        let mut printed = String::new();
        let want = generate(&engine, &req, |t| {
            printed.push_str(t);
            true
        })
        .unwrap();
        let mut stream = engine.stream(&req).unwrap();
        let pieces: Vec<String> = stream.by_ref().map(|p| p.unwrap()).collect();
        assert!(pieces.iter().all(|p| !p.is_empty()));
        assert_eq!(pieces.concat(), printed);
        let got = stream.output();
        assert_eq!(got.text, want.text);
        assert_eq!(got.completion_tokens, want.completion_tokens);
        assert_eq!(stream.finish_reason(), Some(want.finish_reason));
        assert!(stream.next().is_none(), "fused after the end");
    }
}
