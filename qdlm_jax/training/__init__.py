"""Training the tiny dLLMs: the masked-diffusion objective and the resumable trainer."""
