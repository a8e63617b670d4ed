"""Evaluation: the benchmark groups of Table 3 (section 2.3) and contamination analysis (A.6).

``harness`` scores text with a model (log-likelihoods, rolling log-likelihoods, greedy generation
with stop sequences) over our ``Transformer`` or any ``transformers`` causal LM; ``tasks`` turns
each benchmark's published records into requests and metrics; ``evaluator`` runs tasks and builds
the Table 3 summary; ``sandbox`` executes generated code; ``contamination`` finds eval text in
training shards.
"""
