"""Phase 2 of ``data prepare`` (dedup, split, mixture, shard writing) as stages of parallel tasks.

Every stage reads files and writes files under ``OUT/_work/phase2/<fingerprint>/``, so a task
holds one unit, one hash range or one shard at a time, never the corpus:

=========  ==========  ===========================================================================
stage      items       what one item does
=========  ==========  ===========================================================================
units      input unit  phase 1 (prepare.py): clean, tokenise, exact hash, MinHash signature
keys       unit        the unit's exact keys and LSH band keys, sorted into hash-range partitions
dedup      partition   one hash range of one key kind, from every unit: exact duplicates, and
                       the groups of documents sharing a band (verified on the band's values)
resolve    one         "the first occurrence in the global order wins", streaming in that order
split      unit        the unit's kept documents, their validation and mixture draws
plan       one         validation fallback, partial up-sampling cut-offs, accounting, shard layout
write      shard       one shard file and its index
finish     one         manifest.json, then the new splits swapped in
=========  ==========  ===========================================================================

The decisions are the in-memory pipeline's, so the output is byte-identical for any number of
workers, tasks or hash ranges. ``run.py`` runs the stages in a local process pool (the default)
or one task of one stage (``--stage``), which is how a Slurm job array runs them.
"""
