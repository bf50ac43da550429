"""The Runs step (being built)."""

import streamlit as st

from pages._ui import ensure_session

ensure_session()
st.title("Runs")
