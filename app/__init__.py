"""The user interfaces: the Gradio app and the terminal client."""
