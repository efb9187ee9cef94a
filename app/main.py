"""meshplan dashboard: `meshplan dashboard --port P --headless` runs
`streamlit run app/main.py`. Each page is a script under app/views/."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

VIEWS = Path(__file__).resolve().parent / "views"
PAGES = [
    st.Page(str(VIEWS / "plan.py"), title="Plan", icon=":material/calculate:", default=True, url_path="plan"),
    st.Page(str(VIEWS / "compare.py"), title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page(str(VIEWS / "size.py"), title="Size", icon=":material/straighten:", url_path="size"),
    st.Page(str(VIEWS / "data.py"), title="Data", icon=":material/database:", url_path="data"),
    st.Page(str(VIEWS / "schedule.py"), title="Schedule", icon=":material/show_chart:", url_path="schedule"),
    st.Page(str(VIEWS / "runs.py"), title="Runs", icon=":material/directions_run:", url_path="runs"),
    st.Page(str(VIEWS / "accuracy.py"), title="Accuracy", icon=":material/target:", url_path="accuracy"),
]

st.set_page_config(page_title="meshplan", page_icon=":material/calculate:", layout="wide")
st.navigation(PAGES).run()
