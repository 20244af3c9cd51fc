"""The HTML report: self-contained, and its latent explorer decodes in a real
browser exactly as the Python decoder does."""

import re

import pytest
import torch

from conftest import chromium_browser
from vaelab import RunConfig, train
from vaelab.plots import draw_figures
from vaelab.report import write_report

@pytest.fixture(scope="module")
def report(tmp_path_factory, mnist):
    run = tmp_path_factory.mktemp("report") / "run"
    result = train(RunConfig(epochs=1, train_size=3000, test_size=500, device="cpu"), run, mnist, progress=False)
    draw_figures(run, result.model, result.data, result.metrics)
    return write_report(run, result.model, result.data), result.model


def test_report_is_one_self_contained_file(report):
    path, _ = report
    text = path.read_text()
    for section in ("Latent explorer", "Evaluation", "Metrics", "Figures", "Configuration"):
        assert f"<h2>{section}" in text
    assert text.count("data:image/png;base64,") == 7  # every figure of a z_dim=2 run, embedded
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing to fetch


def test_report_shows_the_interpolation_with_a_caption_saying_what_it_is(report):
    path, _ = report
    figure = re.search(r"<figure><img alt='interpolation' src='data:image/png;base64,[^']+'>"
                       r"<figcaption>([^<]*)</figcaption></figure>", path.read_text())
    assert figure and "linear paths between the posterior means" in figure.group(1)


@pytest.mark.slow  # starts Chromium
def test_the_explorer_draws_what_the_python_decoder_draws(report, tmp_path):
    path, model = report
    driver = chromium_browser(tmp_path)  # skips, saying why, where there is no browser
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    try:
        driver.get(path.as_uri())
        plane = driver.find_element(By.ID, "plane")
        for (dx, dy), expected_z in [((100, -50), (2.0, 1.0)), ((-150, 120), (-3.0, -2.4))]:
            ActionChains(driver).move_to_element_with_offset(plane, dx, dy).perform()
            z = driver.execute_script("return window.vaelab.z")
            assert z == pytest.approx(expected_z, abs=0.1)
            rgba = driver.execute_script(
                "const c = window.vaelab.pixels;"
                "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);")
            shown = torch.tensor(rgba[0::4], dtype=torch.float64) / 255
            with torch.no_grad():
                expected = model.decode_mean(torch.tensor([z], dtype=torch.float32))[0].double().flatten()
            assert shown.shape == expected.shape == (784,)
            assert (shown - expected).abs().max() <= 1 / 255 + 1e-4
            assert expected.max() - expected.min() > 0.5  # a digit, not a blank
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()


@pytest.mark.slow  # starts Chromium
def test_sliders_drive_the_explorer_for_a_larger_latent(tmp_path):
    from conftest import synthetic_dataset
    from test_train import tiny_config
    from vaelab.models import ModelConfig

    run = tmp_path / "run"
    config = tiny_config(model=ModelConfig(z_dim=3, encoder_hidden=(16,), decoder_hidden=(16,)))
    result = train(config, run, synthetic_dataset(), progress=False)
    path = write_report(run, result.model, result.data)
    driver = chromium_browser(tmp_path)
    try:
        driver.get(path.as_uri())
        assert driver.execute_script("return document.querySelectorAll('input[type=range]').length") == 3
        driver.execute_script("for (const [id, v] of [['z0', 1.5], ['z2', -0.8]]) {"
                              "  const s = document.getElementById(id); s.value = v;"
                              "  s.dispatchEvent(new Event('input')); }")
        assert driver.execute_script("return window.vaelab.z") == pytest.approx([1.5, 0.0, -0.8])
        rgba = driver.execute_script(
            "const c = window.vaelab.pixels;"
            "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);")
        with torch.no_grad():
            expected = result.model.decode_mean(torch.tensor([[1.5, 0.0, -0.8]]))[0].double().flatten()
        shown = torch.tensor(rgba[0::4], dtype=torch.float64) / 255
        assert (shown - expected).abs().max() <= 1 / 255 + 1e-4
    finally:
        driver.quit()


@pytest.mark.slow  # starts Chromium
def test_the_explorer_names_each_colour_of_the_latent_plane(report, tmp_path):
    path, _ = report
    driver = chromium_browser(tmp_path)
    from selenium.webdriver.support.wait import WebDriverWait

    try:
        driver.get(path.as_uri())
        # Polled, not read once: read right after get() on a loaded machine, it has come back empty.
        keys = WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('#legend .key'), k => "
            "[k.textContent, getComputedStyle(k.querySelector('.swatch')).backgroundColor]);"))
    finally:
        driver.quit()
    assert [name for name, _ in keys] == [str(d) for d in range(10)]
    import matplotlib

    r, g, b, _ = matplotlib.colormaps["tab10"](3)  # the digit 3's colour in latent.png
    assert keys[3][1] == f"rgb({round(255 * r)}, {round(255 * g)}, {round(255 * b)})"


@pytest.mark.slow  # starts Chromium
def test_the_explorer_decodes_a_conv_decoder_in_colour_as_python_does(tmp_path):
    from conftest import synthetic_dataset
    from test_train import tiny_config
    from vaelab.data import Dataset
    from vaelab.models import preset

    grey = synthetic_dataset(shape=(8, 8))
    rgb = Dataset(grey.train_images.repeat(1, 3, 1, 1).flip(2), grey.train_labels,
                  grey.test_images.repeat(1, 3, 1, 1).flip(3), grey.test_labels, grey.directory, False)
    model = preset("conv", conv_channels=(4, 8), encoder_hidden=(16,), decoder_hidden=(16,), z_dim=3,
                   likelihood="logistic", activation="elu")
    run = tmp_path / "run"
    result = train(tiny_config(model=model, epochs=1, optimizer="adam", lr=1e-2), run, rgb, progress=False)
    path = write_report(run, result.model, result.data)
    driver = chromium_browser(tmp_path)
    try:
        driver.get(path.as_uri())
        driver.execute_script("for (const [id, v] of [['z0', 2.5], ['z1', -1.5], ['z2', 0.7]]) {"
                              "  const s = document.getElementById(id); s.value = v;"
                              "  s.dispatchEvent(new Event('input')); }")
        rgba = driver.execute_script(
            "const c = window.vaelab.pixels;"
            "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);")
    finally:
        driver.quit()
    with torch.no_grad():
        expected = result.model.decode_mean(torch.tensor([[2.5, -1.5, 0.7]]))[0].double()  # (3, 8, 8)
    shown = torch.tensor(rgba, dtype=torch.float64).view(8, 8, 4)[..., :3].permute(2, 0, 1) / 255
    assert (shown - expected).abs().max() <= 1 / 255 + 1e-4
    assert (expected[0] - expected[1]).abs().max() > 0.01  # the channels differ: colour, not grey


def test_the_evaluation_section_reads_as_labelled_rows_not_raw_keys(tmp_path):
    import json

    from conftest import synthetic_dataset
    from test_train import tiny_config
    from vaelab.report import build_report, evaluation_rows

    run = tmp_path / "run"
    result = train(tiny_config(epochs=1), run, synthetic_dataset(), progress=False)
    # the run's data is in memory only: its evaluation record written by hand
    record = {"k": 50, "nll": 40.0, "nll_se": 0.01, "nll_se_images": 0.5, "neg_elbo": 42.0,
              "iwae": {"1": 42.0, "5": 41.0, "50": 40.5}, "test_images": 100,
              "test_set_sha256": "ab12",
              "seed": 1234, "unit": "nats per image", "precision": "fp32", "active_units": [2],
              "latent_variance": [[0.5, 0.25]], "kl_per_dim": [1.5, 0.5]}
    (run / "eval.json").write_text(json.dumps(record))
    text = build_report(run, result.model)
    for raw in ("nll_se_images", "iwae.50", "test_set_sha256", "neg_elbo"):
        assert raw not in text.split("<h2>Evaluation")[1].split("<h2>")[0]
    rows = dict(evaluation_rows(record))
    assert rows["test NLL, -log p(x) by importance sampling (K=50)"] == "40.000 nats per image"
    assert rows["negative IWAE bound, k=50, from the same draws"] == "40.500 nats per image"
    assert rows["active units (per stochastic layer)"] == "2 of 2"
