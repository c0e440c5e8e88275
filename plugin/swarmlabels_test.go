package main

import (
	"maps"
	"testing"

	"github.com/docker/docker/api/types/swarm"

	"github.com/zgolden/zgolden/driver"
)

func TestGoldenLabels(t *testing.T) {
	gs := []driver.Golden{
		{Project: "prj_x", Generations: []driver.Generation{{Number: 3}, {Number: 5, GUID: "123"}}},
		{Project: "a.b", Generations: []driver.Generation{{Number: 1}}},
		{Project: "importing", Importing: true}, // no generation yet: not placeable
	}
	want := map[string]string{
		"zg.backend":            "zfs",
		"zg.golden.prj_x":       "true",
		"zg.newest.prj_x":       "5",
		"zg.guid.prj_x":         "123",
		"zg.generation.prj_x.3": "true",
		"zg.generation.prj_x.5": "true",
		"zg.golden.a.b":         "true",
		"zg.newest.a.b":         "1",
		"zg.generation.a.b.1":   "true",
	}
	if got := goldenLabels("zg", "zfs", gs); !maps.Equal(got, want) {
		t.Fatalf("goldenLabels = %v\nwant %v", got, want)
	}
}

func TestWithLabelsKeepsOthers(t *testing.T) {
	spec := swarm.NodeSpec{Annotations: swarm.Annotations{Labels: map[string]string{
		"team": "a", "zg.golden.old": "true", "zgx.golden.keep": "true", "zg": "bare",
	}}}
	got, changed := withLabels(spec, "zg", map[string]string{"zg.golden.new": "true"})
	want := map[string]string{"team": "a", "zgx.golden.keep": "true", "zg": "bare", "zg.golden.new": "true"}
	if !changed || !maps.Equal(got.Labels, want) {
		t.Fatalf("withLabels = %v (changed %v), want %v", got.Labels, changed, want)
	}
	if _, changed := withLabels(got, "zg", map[string]string{"zg.golden.new": "true"}); changed {
		t.Error("the same labels again count as a change: every pass would write the node")
	}
	if _, changed := withLabels(swarm.NodeSpec{}, "zg", map[string]string{}); changed {
		t.Error("no labels on a node with none counts as a change")
	}
}

func TestValidLabelPrefix(t *testing.T) {
	for _, p := range []string{"", "zgolden", "acme.zgolden", "zg-1"} {
		if err := validLabelPrefix(p); err != nil {
			t.Errorf("%q refused: %v", p, err)
		}
	}
	for _, p := range []string{"Zgolden", "zg.", ".zg", "zg..x", "1zg", "zg x", "zg=x"} {
		if err := validLabelPrefix(p); err == nil {
			t.Errorf("%q accepted", p)
		}
	}
}
