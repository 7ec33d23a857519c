"""The live training chart as MRML plot nodes: loss and held-out Dice against the step.

A table node holds the points (columns ``step``, ``loss``, ``heldout_dice``; NaN where the engine
has no Dice estimate yet), two plot series nodes draw them, one chart node groups them. The nodes
live in the scene, so a saved scene keeps the curves. Takes the scene explicitly.
"""
from __future__ import annotations

import math

import slicer
import vtk

TABLE_NAME = "HSSLSegment training"
CHART_NAME = "HSSLSegment training chart"


class TrainingChart:
    """Create or reuse the table/series/chart nodes and append points as progress arrives."""

    def __init__(self, scene, chartNode=None):
        self.scene = scene
        if chartNode is not None and chartNode.GetScene() is scene:
            self.chartNode = chartNode
            series = chartNode.GetNthPlotSeriesNode(0)
            self.tableNode = series.GetTableNode() if series is not None else None
        else:
            self.chartNode = None
            self.tableNode = None
        if self.chartNode is None or self.tableNode is None:
            self._create()

    def _create(self) -> None:
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NAME)
        for name in ("step", "loss", "heldout_dice"):
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            table.AddColumn(column)
        chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", CHART_NAME)
        chart.SetTitle("Fine-tuning")
        chart.SetXAxisTitle("step")
        chart.SetYAxisTitle("loss / Dice")
        for column, color in (("loss", (0.85, 0.35, 0.1)), ("heldout_dice", (0.1, 0.5, 0.85))):
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "held-out Dice" if column != "loss" else "loss")
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.tableNode, self.chartNode = table, chart

    def clear(self) -> None:
        table = self.tableNode.GetTable()
        table.SetNumberOfRows(0)
        table.Modified()
        self.tableNode.Modified()

    def addPoint(self, step: int, loss: float | None, heldoutDice: float | None) -> None:
        table = self.tableNode.GetTable()
        row = table.GetNumberOfRows()
        table.SetNumberOfRows(row + 1)
        values = (float(step), _orNan(loss), _orNan(heldoutDice))
        for column, value in enumerate(values):
            table.GetColumn(column).SetValue(row, value)
        table.Modified()
        self.tableNode.Modified()

    def points(self) -> list[tuple[float, float, float]]:
        table = self.tableNode.GetTable()
        return [tuple(table.GetColumn(c).GetValue(r) for c in range(3)) for r in range(table.GetNumberOfRows())]


def _orNan(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("nan")
