"""Safety Guard: screens the gateway's inputs and outputs (PII, Prompt Guard, Llama Guard, zh-TW)."""
