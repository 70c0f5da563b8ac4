"""Ray Serve deployment of the OpenAI server (optional extra: pip install -e ".[serve]"); see deployment.py."""
