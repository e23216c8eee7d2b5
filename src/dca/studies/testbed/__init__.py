"""`dca testbed`: does the coprocessor add useful serial computation when a frozen model lacks it?

A controlled experiment small enough for one CPU thread. The design below was fixed before any result
was seen; it is not to be tuned until a method wins.

Tasks (`tasks.py`), each generated from a seed, train and test prompts disjoint:

* ``chase`` (the default) -- pointer chasing / variable binding, like ProsQA: 8 assignments ``x=y;``
  over 12 variables, in random order, form three chains (the queried one of h = 1..4 hops, uniformly;
  two distractor chains over the other statements, each ending in its own digit); the question
  ``?q:`` asks for the digit the queried variable resolves to. Every hop is a lookup (find the
  assignment whose left side is the current variable, read its right side), so h hops need ~h
  sequential attention steps; the three chain ends make chance 1/3. Scratchpad: the variables
  visited, then ``>`` and the digit. Tokens (`tokenizer.py`): each assignment and the question are
  one word, so one lookup is one attention step.
* ``add`` (available, not in the default run) -- 4-digit addition, most significant digit first,
  zero-padded to 5, so the first answer digit needs every carry; scratchpad: the sum's digits least
  significant first, then ``>`` and the answer. A calibration of the frozen decoder alone (no
  coprocessor was trained) found the 2-layer decoder at 99 % after 1,500 steps: no headroom.

The decoder (`models.py`) is a 2-layer Llama (hidden 64, 4 heads) built from a config. It is
pretrained on the task's 20,000 training questions with the loss on the answer only, 2,000 steps of
64 questions (AdamW, lr 3e-3, warmup then cosine), and frozen. Its train and test accuracy are
reported (the "stated level"); the length was calibrated on the frozen decoder alone, where hop-1
accuracy levels off (~93 %) while 2-4 hops stay at chance. Then every variant gets the same budget,
300 steps with the same batches in the same order, optimiser and learning rate:

* ``frozen``: the pretrained decoder as it is (no training);
* ``pause-16``: 16 trainable pause tokens after the question;
* ``dca-N`` (N = 1, 4, 16): a full coprocessor (a trained copy of the decoder) in dca's default
  configuration;
* ``paper-N`` (N = 1, 4, 16): the same in the paper's configuration (``CoprocessorConfig.paper``
  where it exists, else its fields: latents are the final states after the final norm, written
  unscaled at t+1 .. t+N);
* ``lora``: a LoRA on the decoder itself (all linear layers) of the rank whose parameter count is
  closest to the coprocessor's;
* ``scratchpad``: the pretrained decoder with every weight fine-tuned on the worked steps (prompt,
  steps, ``>``, answer), at the same budget.

Coprocessors and pause tokens are trained with `AugmentedLM.training_loss` at one augmentation point,
the end of the question (positions = the last question token, num_ahead = the answer's length).
Accuracy is exact match of the whole answer under greedy generation (`AugmentedLM.generate`,
`decoder.generate` for the others), on held-out questions, with a 95 % t-interval over three seeds
(each seed draws its own data, decoder and training order). Cost: training seconds per variant and the
latency of answering one question. The headline comparison is ``dca-16`` and ``paper-16`` against
``pause-16`` (paired by seed), and whether accuracy rises with N.

A reading fixed beforehand: the decoder has 2 layers, the coprocessor another 2 that read all of the
decoder's layers and feed its first, so a coprocessor can at most add depth ~2 -- N adds width, not
depth (the N soft tokens run in one parallel pass). Pause tokens and LoRA add no depth at all; a
scratchpad adds depth with every written token.
"""
