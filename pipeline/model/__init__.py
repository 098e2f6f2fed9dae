"""Models: what a model is (``specs``, no weights), its weights, the per-worker cache and the
handler that runs it, images, bundles and trained heads. The only room that imports torch;
imports the core modules only."""
