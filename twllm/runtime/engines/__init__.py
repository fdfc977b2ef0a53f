"""Engine drivers (vLLM, Ollama) behind one interface (base), and their installed environments (envs)."""
