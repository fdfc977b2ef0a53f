"""Safety Guard: screening of gateway inputs and outputs (see issue 5)."""
