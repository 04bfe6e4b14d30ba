"""Models: the LLaMA-family decoder, the EAGLE-3 drafter, and Hugging Face interop."""
