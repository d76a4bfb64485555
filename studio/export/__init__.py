"""Export a run: merged model, GGUF for llama.cpp/Ollama, and a Modelfile."""
