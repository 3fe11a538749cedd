"""The web demo (`spdinv demo`): a Gradio page and API endpoint `edit` over spdinv.editing.edit().
Gradio is an optional dependency (pip install spdinv[demo]); spdinv.demo.session needs none."""
