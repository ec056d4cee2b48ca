"""Static browser pages: the talk page and the chrome-less viewer page."""
