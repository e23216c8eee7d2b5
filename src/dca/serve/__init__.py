"""The serving side of dca: using a trained coprocessor without writing Python.

* `dca generate` (`dca.serve.generate`): prompts in, continuations streamed to the terminal, frozen and
  augmented side by side with `--compare`;
* `dca serve` (`dca.serve.server`): an OpenAI-compatible HTTP server whose concurrent requests share
  batches (`dca.serve.engine`, `dca.serve.batch`);
* `dca bench-serve` (`dca.serve.bench`): latency and throughput of that server under load, on loopback.

Everything goes through `AugmentedLM.generate`, so whatever `augment` accepts there (True, False) is what
a request's `augment` field can say.
"""
