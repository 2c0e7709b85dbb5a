"""Autograding: the checks that the assignments' locked test cells call, and nbgrader's add-ons.

A test cell imports its assignment's module and calls a check with the student's code::

    from course_utils.grading import ch03
    ch03.check_causal_attention(CausalAttention)

Each ``check_*`` function builds the student's component and the reference component
from this package with the same arguments, on seeded inputs; compares what they
compute within a stated tolerance (following the dtype the student computed in); and
raises a ``CheckFailed`` (an ``AssertionError`` that Jupyter and nbgrader's feedback show
as its message alone) a student can act on: which input, which shape or value, expected
against got, the likely cause when the output matches a known mistake, and a hint in
words. Messages never contain the answer's code.

A check of a component built from earlier pieces (a block from LayerNorms, a loss over a
loader from the batch loss, ...) grades it on the reference pieces, so that each mistake
costs its own points once; see "Grading principles" in ``solutions/README.md``.

The rooms (importing this package imports none of them):

=================  ==================================================================
shared core
``core``           tolerances, seeded inputs, messages, calling student code safely
                   (``_call``), comparing tensors, functions and numbers
``weights``        copying a student's parameters into the reference module (the
                   matching rules), seeded perturbation
``modules``        building a student's module, comparing it with the reference in
                   eval mode, causality, dropout in train and eval mode
``factories``      ``grading_config()`` (the small GPT of the checks), tiny seeded
                   GPTs, token data loaders
one per assignment
``ch02``           tokenizer, sliding-window dataset, embeddings
``ch03``           attention scores, weights, context vectors; self-, causal and
                   multi-head attention
``ch04``           LayerNorm, GELU, feed-forward, transformer block, GPT forward,
                   greedy generation
``ch05``           batch and loader losses, the training loop, sampling probabilities,
                   drawing the next token
``ch06``           classification head, accuracy, classification loss
``ch07``           the Alpaca prompt, instruction collate (padding, masks)
``appendix_a``     pairwise distances, loss and gradients, an MLP, a training loop
``appendix_d``     learning-rate schedule, gradient clipping
``appendix_e``     LoRA layer, linear layer with LoRA, LoRA in every linear layer
nbgrader
``nbgrader_ext``   ``RobustExecute`` (autograding through kernel crashes and floods of
                   output), loaded by ``nbgrader_config.py``; imports no torch
``demo``           ``python -m course_utils.grading.demo``: grade a made-up class
=================  ==================================================================

A new assignment gets its own module here, built from the core's helpers, and a test
module ``tests/grading/test_<assignment>.py`` whose ``CASES`` table gives every check a
correct and a broken implementation (see ``solutions/README.md``).
"""
