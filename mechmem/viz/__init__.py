"""Inspection pages: look at a sample's attention before believing a number about it.

Per sample, one HTML page shows the 64 tokens (prefix | suffix), every head's attention pattern as
circuitsvis views, the sample's memorization facts and taxonomy class, what the trained CNNs
predict for it, and its class's decisive-region map with the heads localization ranked highest.
An index page lists the samples by class; a matplotlib grid per sample sits beside each page.

One job a module:
- `samples`: choosing samples and gathering what their pages show (`inspect_run`, `SampleView`);
- `pages`: the self-contained, offline HTML pages (`write_pages`, `sample_page`, `index_page`);
- `grids`: the PNG attention grid for reports (`attention_grid_png`);
- `browser`: headless chromium through Playwright, to check pages offline and take screenshots;
- `spans`: what the regurgitation monitor (`mechmem.monitor`) found, as a page, marked terminal text
  and JSON records (`monitor_html`, `terminal_marked`, `span_records`, `token_pieces`).
"""

from mechmem.viz.browser import (LOCAL_SCHEMES, Browser, PageCheck, browser_missing, check_page,
                                 find_chromium)
from mechmem.viz.grids import attention_grid_png
from mechmem.viz.pages import circuitsvis_bundle, head_label, index_page, sample_page, write_pages
from mechmem.viz.samples import (PROPOSED_TAXONOMY, RANKING_COLUMNS, InspectConfig, RunOutputs,
                                 SampleView, check_ranking, class_map, cnn_input, cnn_probabilities,
                                 heads_for_class, inspect_run, load_localization, lookup_model_view,
                                 pick_samples, read_run, sample_decisive_maps, sample_views, token_strings)
from mechmem.viz.spans import class_colours, flag_counts, monitor_html, span_records, terminal_marked, token_pieces

__all__ = [
    "LOCAL_SCHEMES", "Browser", "PageCheck", "browser_missing", "check_page", "find_chromium",
    "attention_grid_png",
    "circuitsvis_bundle", "head_label", "index_page", "sample_page", "write_pages",
    "PROPOSED_TAXONOMY", "RANKING_COLUMNS", "InspectConfig", "RunOutputs", "SampleView", "check_ranking", "class_map",
    "cnn_input", "cnn_probabilities", "heads_for_class", "inspect_run", "load_localization", "lookup_model_view",
    "pick_samples", "read_run", "sample_decisive_maps", "sample_views", "token_strings",
    "class_colours", "flag_counts", "monitor_html", "span_records", "terminal_marked", "token_pieces",
]
