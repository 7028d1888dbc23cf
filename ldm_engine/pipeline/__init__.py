"""The pieces of Engine.generate(): argument checks, prompt conditioning, image in/out, timing."""
