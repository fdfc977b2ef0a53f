"""The offline example's models (random-weights demo chat model, a MiniLM copy), built on this host."""
